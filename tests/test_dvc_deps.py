"""dvc.yaml's code deps are exactly each stage's import closure (:mod:`pipelines.deps`), so ``dvc repro`` can
never reuse a stale output nor rerun a stage for an edit that cannot change it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines import deps

REPO = deps.REPO
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_import_closure(stage: str) -> None:
    missing, extra = deps.stale({stage: STAGES[stage]}).get(stage, ([], []))
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r}: missing deps {missing}, extra deps {extra}: run `python -m pipelines.deps --write`"
    )


def test_package_inits_hold_no_code() -> None:
    # The closure leaves __init__ files out; that is only right while they hold nothing but docstrings.
    for init in [
        *REPO.glob("gptlab/**/__init__.py"),
        REPO / "stages/__init__.py",
        REPO / "pipelines/__init__.py",
    ]:
        if init.is_relative_to(REPO / "gptlab/chatui"):
            continue  # sets Gradio's offline env defaults; no stage imports the chat page (tests/test_layers.py)
        tree = ast.parse(init.read_text())
        code = [n for n in tree.body if not isinstance(n, ast.Expr | ast.Assign)]
        assert not code, f"{init.relative_to(REPO)} runs code: the deps closure would miss it"


def test_closure_follows_from_imports_of_modules_and_lazy_imports() -> None:
    closure = {p.relative_to(REPO).as_posix() for p in deps.import_closure("stages.sft")}
    assert "stages/tracking.py" in closure  # `from stages import tracking`
    assert "stages/records.py" in closure and "gptlab/instruct.py" in closure
    assert "gptlab/lora.py" in closure  # imported inside gptlab.load.load_checkpoint only
    assert not any(p.startswith("pipelines/") for p in closure)


def test_data_stages_do_not_depend_on_model_code_and_lora_only_reruns_its_users() -> None:
    code = deps.code_deps(STAGES)
    for stage in ("download", "tokenize"):
        assert not {"gptlab/model.py", "gptlab/llama.py", "gptlab/lora.py", "gptlab/checkpoint.py"} & set(
            code[stage]
        )
    users = {stage for stage, files in code.items() if "gptlab/lora.py" in files}
    assert users == {"base_model", "classify", "sft", "dpo", "benchmark", "export"}


def test_write_restores_a_removed_dep_and_keeps_comments_and_data_deps(tmp_path: Path) -> None:
    for name in ("gptlab", "stages", "pipelines"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    text = (REPO / "dvc.yaml").read_text()
    broken = text.replace("      - stages/tokenize.py\n", "", 1)
    assert broken != text
    (tmp_path / "dvc.yaml").write_text(broken)
    assert deps.main(["--check", "--dvc-yaml", str(tmp_path / "dvc.yaml")]) == 1
    assert deps.main(["--write", "--dvc-yaml", str(tmp_path / "dvc.yaml")]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == text
    assert deps.main(["--check", "--dvc-yaml", str(tmp_path / "dvc.yaml")]) == 0
