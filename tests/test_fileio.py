"""Atomic writes leave either the old or the complete new content, never a temp file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from gptlab.checkpoint import Checkpointer, save_checkpoint
from gptlab.config import GPTConfig
from gptlab.fileio import atomic_dir, make_temp, sweep_temps, write_json, write_text
from gptlab.model import GPT


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


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writers_are_swept(tmp_path) -> None:
    # What `kill -9` leaves: a dead writer's temp dir, a temp file in the old mkstemp naming, an unrelated dotfile.
    (tmp_path / "out").mkdir()
    dead = tmp_path / f".out.{dead_pid()}-0123456789ab.tmp"
    dead.mkdir()
    (dead / "weights").write_bytes(b"x" * 100)
    legacy = tmp_path / ".out.k2j_9xq1.tmp"
    legacy.write_text("half")
    other = tmp_path / ".outer.tmp"
    other.write_text("not ours")
    other_target = tmp_path / f".out.b.{dead_pid()}-0123456789ab.tmp"  # a temp of `out.b`, not of `out`
    other_target.write_text("x")
    with atomic_dir(tmp_path / "out") as d:
        (d / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", ".outer.tmp", other_target.name])


def test_live_writers_temp_is_kept(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.{proc.pid}-0123456789ab.tmp"
        live.mkdir()
        sweep_temps(tmp_path / "out")
        assert live.is_dir()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        sweep_temps(tmp_path / "out")
        assert not live.exists()
    finally:
        proc.kill()


def test_temp_names_carry_the_pid_and_ordinary_mode(tmp_path) -> None:
    tmp = make_temp(tmp_path / "x.json")
    assert tmp.name.startswith(f".x.json.{os.getpid()}-") and tmp.name.endswith(".tmp")
    umask = os.umask(0)
    os.umask(umask)
    assert tmp.stat().st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_swap_restores_the_previous_checkpoint(tmp_path) -> None:
    # Killed between replace_dir's two renames: only `.ckpt.old` (the previous complete checkpoint) remains.
    model = GPT(GPTConfig(vocab_size=16, context_length=4, n_embd=8, n_head=2, n_layer=1))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(model, {"step": 3})
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old")
    assert Checkpointer(tmp_path / "ckpt").load_state() == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # With the new version in place, a stale `.old` is just removed.
    (tmp_path / ".ckpt.old").mkdir()
    save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
