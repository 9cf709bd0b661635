"""dvc.yaml's code deps, computed: each stage depends on exactly the repository modules its command imports.

A stage runs ``python -m stages.<name>``; every module of this repository it imports, directly or through other
modules, at the top or inside a function, can change what the stage computes, and nothing else can. So the
``.py`` deps of each stage are its import closure, followed with ``ast`` (the code is read, never run):

    python -m pipelines.deps            # print each stage's code deps
    python -m pipelines.deps --check    # exit 1 naming the stages whose dvc.yaml deps differ
    python -m pipelines.deps --write    # rewrite them in dvc.yaml (comments, data deps and order kept)

A missing dep would let ``dvc repro`` reuse a stale output; an extra one reruns a stage for nothing. Package
``__init__.py`` files are left out: they hold only docstrings (tests/test_dvc_deps.py checks that).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

PACKAGES = ("gptlab", "stages", "pipelines")
REPO = Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The repository file of a dotted module name (a package's ``__init__.py``), or None if it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = root / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Dotted names of every module ``path`` imports anywhere in its body (lazy imports included)."""
    names: set[str] = set()
    package = ".".join(path.with_suffix("").relative_to(root).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            # `from stages import tracking` imports the module stages.tracking.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
    names.update(".".join(n.split(".")[:i]) for n in list(names) for i in range(1, n.count(".") + 1))
    return names


def import_closure(module: str, root: Path = REPO) -> set[Path]:
    """Repository files ``module`` runs when imported: itself and everything it imports, transitively,
    package ``__init__`` files excluded (they hold no code)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop(), root)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path, root))
    return {p for p in seen if p.name != "__init__.py"}


def stage_module(cmd: str) -> str:
    match = re.match(r"python -m (stages\.\w+)\b", cmd)
    if not match:
        raise ValueError(f"dvc.yaml: stage command {cmd!r} does not run `python -m stages.<name>`")
    return match.group(1)


def code_deps(stages: dict, root: Path = REPO) -> dict[str, list[str]]:
    """Each stage's code deps, sorted: the ``.py`` files of its command's import closure."""
    return {
        name: sorted(p.relative_to(root).as_posix() for p in import_closure(stage_module(spec["cmd"]), root))
        for name, spec in stages.items()
    }


def stale(stages: dict, root: Path = REPO) -> dict[str, tuple[list[str], list[str]]]:
    """Stages whose listed ``.py`` deps differ from their closure: ``{stage: (missing, extra)}``."""
    out = {}
    for name, deps in code_deps(stages, root).items():
        listed = {d for d in stages[name].get("deps", []) if d.endswith(".py")}
        missing, extra = sorted(set(deps) - listed), sorted(listed - set(deps))
        if missing or extra:
            out[name] = (missing, extra)
    return out


def write(dvc_yaml: Path) -> list[str]:
    """Rewrite each stage's ``.py`` deps in ``dvc_yaml`` as its closure (code first, then the data deps, as
    listed); returns the names of the stages that changed. ruamel keeps the file's comments and layout."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(dvc_yaml.read_text())
    changed = []
    for name, deps in code_deps(doc["stages"], dvc_yaml.parent).items():
        spec = doc["stages"][name]
        old = list(spec.get("deps", []))
        new = deps + [d for d in old if not str(d).endswith(".py")]
        if new != old:
            spec["deps"] = new
            changed.append(name)
    if changed:
        tmp = dvc_yaml.with_name(f".{dvc_yaml.name}.tmp")
        with tmp.open("w") as f:
            yaml.dump(doc, f)
        tmp.replace(dvc_yaml)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.deps", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml's code deps are stale")
    action.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    parser.add_argument("--dvc-yaml", type=Path, default=REPO / "dvc.yaml")
    args = parser.parse_args(argv)
    import yaml

    stages = yaml.safe_load(args.dvc_yaml.read_text())["stages"]
    if args.write:
        changed = write(args.dvc_yaml)
        print(f"{args.dvc_yaml}: code deps rewritten for {', '.join(changed)}" if changed else "up to date")
        return 0
    if args.check:
        problems = stale(stages, args.dvc_yaml.parent)
        for name, (missing, extra) in problems.items():
            print(f"{args.dvc_yaml}: stage {name!r}: missing {missing}, extra {extra}", file=sys.stderr)
        if problems:
            print("run `python -m pipelines.deps --write`", file=sys.stderr)
        return 1 if problems else 0
    for name, deps in code_deps(stages, args.dvc_yaml.parent).items():
        print(f"{name}:", *deps, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
