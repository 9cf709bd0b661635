"""dvc.yaml's code deps are exactly each stage's import closure, so ``dvc repro`` can never reuse a stale output.

A stage runs ``python -m stages.<name>``; every module of this repository it imports, directly or through other
modules, at the top or inside a function, changes what the stage computes. The test follows the imports with
``ast`` and compares with the ``.py`` files dvc.yaml lists: a missing one means an edit would not rerun the stage;
an extra one means an edit reruns it for nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gptlab", "stages", "pipelines")
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The repository file of a dotted module name (a package's ``__init__.py``), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports anywhere in its body (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from stages import tracking` imports the module stages.tracking.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_closure(module: str) -> set[Path]:
    """Repository files ``module`` runs when imported: itself and everything it imports, transitively."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    # Package __init__ files run too, but hold no code (checked below), so they change nothing.
    return {p for p in seen if p.name != "__init__.py"}


def stage_module(cmd: str) -> str:
    match = re.match(r"python -m (stages\.\w+)\b", cmd)
    assert match, f"stage command {cmd!r} does not run `python -m stages.<name>`"
    return match.group(1)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_import_closure(stage: str) -> None:
    spec = STAGES[stage]
    closure = {p.relative_to(REPO).as_posix() for p in import_closure(stage_module(spec["cmd"]))}
    listed = {d for d in spec["deps"] if d.endswith(".py")}
    missing, extra = sorted(closure - listed), sorted(listed - closure)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r}: add deps {missing}, remove deps {extra}; "
        f"the closure is: {sorted(closure)}"
    )


def test_package_inits_hold_no_code() -> None:
    for package in PACKAGES:
        tree = ast.parse((REPO / package / "__init__.py").read_text())
        code = [n for n in tree.body if not isinstance(n, ast.Expr | ast.Assign)]
        assert not code, f"{package}/__init__.py runs code: list it in dvc.yaml's deps and drop this shortcut"


def test_closure_follows_from_imports_of_modules_and_lazy_imports() -> None:
    closure = {p.relative_to(REPO).as_posix() for p in import_closure("stages.sft")}
    assert "stages/tracking.py" in closure  # `from stages import tracking`
    assert "stages/records.py" in closure and "gptlab/instruct.py" in closure
    assert "stages/plots.py" in closure and "gptlab/fileio.py" in closure
    assert not any(p.startswith("pipelines/") for p in closure)
