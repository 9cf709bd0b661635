"""The layers hold by contract: ``lint-imports`` checks pyproject.toml's import-linter contracts (the library
never imports the pipeline or its tools; the core never imports the server, chat page or CLI; stages never
import the flows; the data stages never import model code)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # --no-cache: import-linter would otherwise write its cache into the working tree.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300
    )


def test_contracts_are_kept() -> None:
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_its_contract(tmp_path: Path) -> None:
    for name in ("gptlab", "stages", "pipelines"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    model = tmp_path / "gptlab" / "model.py"
    model.write_text(
        model.read_text() + "\n\ndef _serve():\n    from gptlab.serve import app  # noqa: F401\n"
    )
    tokenize = tmp_path / "stages" / "tokenize.py"
    tokenize.write_text(
        tokenize.read_text() + "\n\ndef _lora():\n    from gptlab import lora  # noqa: F401\n"
    )
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "gptlab.model is not allowed to import gptlab.serve" in proc.stdout
    assert "stages.tokenize is not allowed to import gptlab.lora" in proc.stdout
    assert "2 broken" in proc.stdout
