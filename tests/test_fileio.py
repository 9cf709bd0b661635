"""Atomic writes leave either the old or the complete new content, never a temp file."""

from __future__ import annotations

import json

import pytest

from gptlab.fileio import atomic_dir, write_json, write_text


def test_write_json_atomic(tmp_path) -> None:
    write_json(tmp_path / "m" / "x.json", {"a": 1})
    assert json.loads((tmp_path / "m" / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["x.json"]


def test_failed_write_keeps_old_file(tmp_path) -> None:
    write_text(tmp_path / "x.txt", "old")
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.txt", {"bad": object()})
    assert (tmp_path / "x.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_dir_replaces_on_success_only(tmp_path) -> None:
    with atomic_dir(tmp_path / "out") as d:
        (d / "a.txt").write_text("1")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as d:
        (d / "b.txt").write_text("2")
        raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]
    with atomic_dir(tmp_path / "out") as d:
        (d / "c.txt").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["c.txt"]
