"""Switch the active params profile: ``./run.sh profile book`` (or ``sample``).

``params.yaml`` is always a copy of one file in ``profiles/``; switching copies it over atomically, so the next
``dvc repro`` reruns exactly the stages whose sections differ. No hand-editing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from gptlab.fileio import write_text

ROOT = Path(__file__).resolve().parents[1]


def available(root: Path = ROOT) -> list[str]:
    return sorted(p.stem for p in (root / "profiles").glob("*.yaml"))


def current(root: Path = ROOT) -> str:
    data = yaml.safe_load((root / "params.yaml").read_text()) or {}
    return str(data.get("profile", "custom"))


def activate(name: str, root: Path = ROOT) -> Path:
    source = root / "profiles" / f"{name}.yaml"
    if not source.is_file():
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(available(root))}")
    write_text(root / "params.yaml", source.read_text())
    return source


def apply_overrides(overrides: list[str], root: Path = ROOT) -> None:
    """Apply ``section.key.sub=value`` overrides to params.yaml (values parsed as YAML, like ``dvc exp run -S``)."""
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected section.key=value")
        *path, last = key.split(".")
        node = params
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: params.yaml has no section {part!r}")
            node = node[part]
        if last not in node:
            raise ValueError(f"override {item!r}: params.yaml has no key {key!r}")
        node[last] = yaml.safe_load(raw)
    write_text(root / "params.yaml", yaml.safe_dump(params, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profile", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="profile to activate (omit to show the active one)")
    args = parser.parse_args(argv)
    if args.name is None:
        print(f"active profile: {current()} (available: {', '.join(available())})")
        return 0
    try:
        source = activate(args.name)
    except ValueError as exc:
        print(f"profile: error: {exc}", file=sys.stderr)
        return 2
    print(f"params.yaml <- {source.relative_to(ROOT)}; run `./run.sh pipeline` (or `dvc repro`) to apply")
    return 0


if __name__ == "__main__":
    sys.exit(main())
