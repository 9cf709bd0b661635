"""Switch the active params profile: ``./run.sh profile book`` (or ``sample``).

``params.yaml`` is always a copy of one file in ``profiles/``; switching copies it over atomically, so the next
``dvc repro`` reruns exactly the stages whose sections differ. No hand-editing: ``--mirror DIR`` sets
``download.mirror`` (local copies of the sources, tried before their URLs) in the copy. Edits go through
ruamel.yaml's round trip, so the profile's comments stay.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from gptlab.fileio import write_text

ROOT = Path(__file__).resolve().parents[1]


def available(root: Path = ROOT) -> list[str]:
    return sorted(p.stem for p in (root / "profiles").glob("*.yaml"))


def current(root: Path = ROOT) -> str:
    data = yaml.safe_load((root / "params.yaml").read_text()) or {}
    return str(data.get("profile", "custom"))


def _round_trip() -> YAML:
    rt = YAML()  # round-trip mode: comments, key order and quoting survive
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap long values (URLs)
    rt.indent(mapping=2, sequence=4, offset=2)  # the profiles' "  key:\n    - item" layout
    rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return rt


def _set(params, key: str, value, what: str) -> None:
    *path, last = key.split(".")
    node = params
    for part in path:
        if not isinstance(node.get(part), dict):
            raise ValueError(f"{what}: params.yaml has no section {part!r}")
        node = node[part]
    if last not in node:
        raise ValueError(f"{what}: params.yaml has no key {key!r}")
    node[last] = value


def _edited(text: str, changes: list[tuple[str, object, str]]) -> str:
    """``text`` (params YAML) with ``(dotted key, value, what)`` set, comments kept; ``what`` names the change
    in errors."""
    if not changes:
        return text
    rt = _round_trip()
    params = rt.load(text) or {}
    for key, value, what in changes:
        _set(params, key, value, what)
    out = io.StringIO()
    rt.dump(params, out)
    return out.getvalue()


def activate(name: str, root: Path = ROOT, *, mirror: str | None = None) -> Path:
    """Copy ``profiles/<name>.yaml`` to params.yaml; ``mirror`` sets ``download.mirror`` in the copy. Written
    once, when complete: a failure leaves params.yaml as it was."""
    source = root / "profiles" / f"{name}.yaml"
    if not source.is_file():
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(available(root))}")
    changes = []
    if mirror is not None:
        if not Path(mirror).expanduser().is_dir():
            raise ValueError(f"--mirror {mirror}: not a directory")
        changes.append(("download.mirror", str(Path(mirror).expanduser().resolve()), "--mirror"))
    write_text(root / "params.yaml", _edited(source.read_text(), changes))
    return source


def apply_overrides(overrides: list[str], root: Path = ROOT) -> None:
    """Apply ``section.key.sub=value`` overrides to params.yaml (values parsed as YAML, like ``dvc exp run -S``),
    keeping the file's comments."""
    changes = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected section.key=value")
        changes.append((key, yaml.safe_load(raw), f"override {item!r}"))
    path = root / "params.yaml"
    write_text(path, _edited(path.read_text(), changes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profile", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="profile to activate (omit to show the active one)")
    parser.add_argument(
        "--mirror", metavar="DIR", help="directory of local copies of the sources, tried before their URLs"
    )
    args = parser.parse_args(argv)
    if args.name is None:
        if args.mirror is not None:
            parser.error("--mirror needs a profile name")
        print(f"active profile: {current()} (available: {', '.join(available())})")
        return 0
    try:
        source = activate(args.name, mirror=args.mirror)
    except ValueError as exc:
        print(f"profile: error: {exc}", file=sys.stderr)
        return 2
    print(f"params.yaml <- {source.relative_to(ROOT)}; run `./run.sh pipeline` (or `dvc repro`) to apply")
    return 0


if __name__ == "__main__":
    sys.exit(main())
