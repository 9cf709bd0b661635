"""Fault suite: ``kill -9`` at the moments that matter, then rerun, as an unlucky user would.

Pretraining killed at each kind of moment that leaves something behind — mid-step between checkpoints, then
(restarted) while a checkpoint is being written, then (restarted again) during the final write into
``models/pretrain`` — resumes from its last checkpoint each time and ends with byte-identical weights and
metrics; a download killed mid-transfer resumes from its partial file; and after each successful rerun no temp
directory is left under ``data/``, ``models/`` or ``work/``. Interrupted runs whose params were changed back (so
DVC's run cache serves the rerun) leave no work directory behind either.

Torch runs single-threaded here: a multi-threaded BLAS may sum in a different order in another process, which
changes the last bit of a weight independently of resuming (see README, "Failure behaviour").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from clones import TINY_PRETRAIN, clean_env, make_clone, run, set_params
from datasets_server import serve

pytestmark = pytest.mark.slow
PRETRAIN = [
    *["python", "-m", "stages.pretrain", "--tokens", "data/tokens", "--model", "models/pretrain"],
    *["--metrics", "metrics/pretrain.json", "--loss-csv", "plots/pretrain/loss.csv"],
    *["--loss-png", "plots/pretrain/loss.png", "--samples", "outputs/pretrain/samples.json"],
    *["--work", "work/pretrain"],
]
RESULTS = ["models/pretrain/model.safetensors", "models/pretrain/config.json", "metrics/pretrain.json"]


def leftovers(root: Path) -> list[str]:
    """Temp files/dirs (``.name.<pid>-<hex>.tmp``, ``.name.old``) under the output trees."""
    found = []
    for top in ("data", "models", "work", "metrics", "plots", "outputs"):
        for path in (root / top).rglob(".*"):
            if path.name.endswith((".tmp", ".old")):
                found.append(str(path.relative_to(root)))
    return found


def fingerprint(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in RESULTS}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = make_clone(tmp_path_factory.mktemp("faults") / "gptlab")
    set_params(root, TINY_PRETRAIN)
    run([sys.executable, "-m", "dvc", "repro", "tokenize"], root, env(root))
    return root


def env(root: Path, **extra: str) -> dict[str, str]:
    # Unbuffered: a killed stage's last lines reach the pipe.
    return clean_env(root, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def start(cmd: list[str], root: Path, environ: dict[str, str]) -> subprocess.Popen:
    # A session of its own so that the kill reaches every process of the stage (tokenizer pools, etc.).
    return subprocess.Popen(
        [sys.executable if c == "python" else c for c in cmd],
        cwd=root,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill9(proc: subprocess.Popen) -> str:
    """``kill -9`` the stage's whole session; what it printed until then."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=60)[0]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``predicate`` every 2 ms until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the stage")


def checkpoints(work: Path) -> list[Path]:
    """Complete checkpoint directories (temp ones are hidden)."""
    return [d for d in work.glob("[!.]*")] if work.is_dir() else []


def checkpoints_seen(work: Path):
    """A predicate counting checkpoints saved so far (each save replaces the directory: a new inode)."""
    seen: set[int] = set()

    def count() -> int:
        for d in checkpoints(work):
            with contextlib.suppress(FileNotFoundError):
                seen.add(d.stat().st_ino)
        return len(seen)

    return count


def kill_points(root: Path) -> list[tuple[str, object]]:
    """(moment, a maker of the predicate that says it has come), in the order one run meets them."""
    work, models = root / "work" / "pretrain", root / "models"

    def mid_step():
        count = checkpoints_seen(work)
        return lambda: count() >= 2 and (time.sleep(0.01) or True)  # a step after a new checkpoint

    def mid_checkpoint_write():
        count = checkpoints_seen(work)
        return lambda: count() >= 1 and any(work.glob(".*.tmp"))  # a later save's temp directory exists

    return [
        ("mid-step", mid_step),
        ("mid-checkpoint-write", mid_checkpoint_write),
        ("final write", lambda: lambda: any(models.glob(".pretrain.*.tmp"))),
    ]


def test_pretrain_killed_at_each_moment_reruns_byte_identical(clone: Path) -> None:
    run(PRETRAIN, clone, env(clone))
    reference = fingerprint(clone)
    assert not (clone / "work" / "pretrain").exists() and leftovers(clone) == []
    for rel in ("models/pretrain", "work/pretrain"):
        subprocess.run(["rm", "-rf", str(clone / rel)], check=True)
    # One run killed at each moment in turn: every restart resumes from the checkpoint the last kill left.
    for i, (phase, make_predicate) in enumerate(kill_points(clone)):
        predicate = make_predicate()
        proc = start(PRETRAIN, clone, env(clone))
        if not wait_for(predicate, proc):
            pytest.fail(f"{phase}: the stage ended before that moment:\n{proc.communicate()[0]}")
        out = kill9(proc)
        assert i == 0 or "pretrain: resuming from" in out, f"{phase}: the restart's output:\n{out}"
    out = run(PRETRAIN, clone, env(clone)).stdout
    assert "pretrain: resuming from" in out, f"the rerun after the final-write kill:\n{out}"
    assert fingerprint(clone) == reference, f"the rerun differs; its output:\n{out}"
    assert not (clone / "work" / "pretrain").exists()
    assert leftovers(clone) == []


def interrupted_run(clone: Path, max_steps: int) -> Path:
    """Start pretraining with ``max_steps`` and ``kill -9`` it after its first checkpoint; that checkpoint."""
    set_params(clone, {"pretrain": {"train": {"max_steps": max_steps}}})
    before = set(checkpoints(clone / "work" / "pretrain"))
    proc = start(PRETRAIN, clone, env(clone))
    assert wait_for(lambda: set(checkpoints(clone / "work" / "pretrain")) - before, proc)
    kill9(proc)
    (new,) = set(checkpoints(clone / "work" / "pretrain")) - before
    return new


def test_orphaned_work_dirs_are_removed(clone: Path) -> None:
    original = (clone / "params.yaml").read_text()
    # An interrupted run of other params is removed when pretraining starts with new params ...
    stale = interrupted_run(clone, 41)
    kept = interrupted_run(clone, 42)
    # (The kill may land inside a later save, leaving its hidden temp directory: the next run clears it.)
    assert not stale.exists() and checkpoints(clone / "work" / "pretrain") == [kept]
    (clone / "params.yaml").write_text(original)
    run([sys.executable, "-m", "dvc", "repro", "pretrain"], clone, env(clone))
    assert not (clone / "work" / "pretrain").exists()  # ... and a finished run removes its own work dir.
    # When DVC has nothing to rerun (the params are back to a finished run's), the pipeline removes it.
    interrupted_run(clone, 43)
    (clone / "params.yaml").write_text(original)
    out = run(["./run.sh", "pipeline", "--no-prefect", "--target", "pretrain"], clone, env(clone)).stdout
    assert "Running stage 'pretrain'" not in out
    assert not (clone / "work" / "pretrain").exists()
    assert leftovers(clone) == []


def test_download_killed_mid_transfer_resumes(shared_dir: Path, clone: Path, tmp_path: Path) -> None:
    source = shared_dir / "datasets" / "middlemarch.txt"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    cmd = ["python", "-m", "stages.download", "--out", "data/raw", "--metrics", "metrics/download.json"]
    original = (clone / "params.yaml").read_text()
    before = sorted(p.name for p in (clone / "data" / "raw").iterdir())
    with serve(shared_dir / "datasets") as server:
        params = yaml.safe_load(original)
        params["download"]["sources"]["corpus.txt"] = {
            "url": server.url("/files/middlemarch.txt"),
            "sha256": digest,
        }
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        server.script = ["hang"]
        server.cut_after = 1_500_000  # past the first 1 MiB chunk, which reaches the partial file
        proc = start(cmd, clone, env(clone, GPTLAB_CACHE=str(cache)))
        partial = cache / "partial"
        assert wait_for(lambda: any(p.stat().st_size >= 1 << 20 for p in partial.glob("*.part")), proc)
        kill9(proc)
        assert any(clone.glob("data/.raw.*.tmp")), "the killed stage had a staging directory"
        assert sorted(p.name for p in (clone / "data" / "raw").iterdir()) == before  # old output intact
        run(cmd, clone, env(clone, GPTLAB_CACHE=str(cache)))
        assert server.seen[-1].headers.get("Range") == f"bytes={1 << 20}-"
    assert (clone / "data" / "raw" / "corpus.txt").read_bytes() == source.read_bytes()
    assert leftovers(clone) == [] and not list(partial.glob("*.part"))
    (clone / "params.yaml").write_text(original)
