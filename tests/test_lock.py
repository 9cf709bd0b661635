"""``requirements.lock``, the tested environment: it satisfies every range in pyproject.toml (a range edited
without ``./run.sh lock`` fails here), every entry is pinned and hash-checked, torch is left to set-up, and the
environment the tests run in is the locked one wherever the lock applies (CPython 3.11 on Linux x86_64)."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def locked(here_only: bool = False) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes), read from the lock's ``name==version [; marker] \\`` entries; with
    ``here_only``, only those whose marker holds for this interpreter."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (REPO / "requirements.lock").read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = re.match(r"([A-Za-z0-9._-]+)==([^\s;]+)(?:\s*;\s*([^\\\n]+))?", block)
        if head and not (here_only and head[3] and not Marker(head[3].strip()).evaluate()):
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
            entries[canonicalize_name(head[1])] = (head[2], hashes)
    return entries


def test_every_entry_is_pinned_and_hashed_and_torch_is_left_to_set_up() -> None:
    entries = locked()
    assert len(entries) > 100
    assert all(hashes for _, hashes in entries.values()), [n for n, (_, h) in entries.items() if not h]
    assert "torch" not in entries and not any(n.startswith("nvidia-") for n in entries)
    assert (
        entries["llms-from-scratch"][0]
        == re.search(r"BOOK_CODE_VERSION=(\S+)", (REPO / "run.sh").read_text())[1]
    )


def test_the_lock_satisfies_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    entries = locked()
    env = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}
    for spec in map(Requirement, wanted):
        if spec.marker is not None and not spec.marker.evaluate(env):
            continue
        name = canonicalize_name(spec.name)
        if name == "torch":
            continue  # installed by run.sh before the lock: the CPU or the CUDA build, as the machine needs
        assert name in entries, f"{spec} is not in requirements.lock: run ./run.sh lock"
        version = entries[name][0]
        assert spec.specifier.contains(version, prereleases=True), (
            f"{spec}: locked {version}; run ./run.sh lock"
        )


@pytest.mark.skipif(
    (sys.version_info[:2], sys.platform, platform.machine()) != ((3, 11), "linux", "x86_64"),
    reason="the lock is for CPython 3.11 on Linux x86_64",
)
def test_the_tested_environment_is_the_locked_one() -> None:
    differ = {}
    for name, (version, _) in locked(here_only=True).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differ[name] = (version, installed)
    assert not differ, f"installed packages differ from requirements.lock (locked, installed): {differ}"
