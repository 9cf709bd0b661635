"""Fresh temporary clones of the working tree for end-to-end tests (tests never write into the repo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "gptlab-tests",
    "GIT_AUTHOR_EMAIL": "tests@gptlab.invalid",
    "GIT_COMMITTER_NAME": "gptlab-tests",
    "GIT_COMMITTER_EMAIL": "tests@gptlab.invalid",
}

# A few steps per stage: the whole pipeline in about a minute (tests of wiring, not of quality: the stage
# functions' own tests make the quality claims).
FEW_STEPS = {"epochs": None, "max_steps": 2, "warmup_steps": 0, "eval_interval": 100, "eval_batches": 1}
TINY_PARAMS = {
    "pretrain": {
        "model": "gpt-micro",  # 2 layers, 64 wide: the vocabulary head is most of every stage's compute
        "train": {
            "max_steps": 4,
            "warmup_steps": 0,
            "eval_interval": 2,
            "eval_batches": 1,
            "checkpoint_interval": 0,
            "log_interval": 2,
        },
        "sample_max_new_tokens": 3,
    },
    "base_model": {"eval_batches": 1},
    # LoRA kept separate exercises the adapter save/load path end to end.
    "classify": {"trainable": "lora", "lora": {"merge": False}, "train": FEW_STEPS},
    "sft": {"train": FEW_STEPS, "max_new_tokens": 2},
    "dpo": {"train": FEW_STEPS, "max_new_tokens": 2},
}

TINY_PRETRAIN = {
    "pretrain": {
        "model": "gpt-micro",
        "model_overrides": {"n_layer": 2, "dropout": 0.1},
        "context_length": 32,
        "batch_size": 4,
        "train": {
            "max_steps": 24,
            "warmup_steps": 4,
            "eval_interval": 12,
            "eval_batches": 2,
            "checkpoint_interval": 3,
            "log_interval": 5,
        },
        "sample_max_new_tokens": 4,
    }
}
"""Pretraining in seconds: a 2-layer micro GPT on the sample corpus, checkpointing often (the fault tests kill it
between checkpoints)."""


def git(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True, capture_output=True, text=True
    )
    return out.stdout


def make_clone(dst: Path) -> Path:
    """Copy what a clone of the current working tree would hold (tracked + untracked-not-ignored) and commit it."""
    files = git("ls-files", "-co", "--exclude-standard", "-z", cwd=REPO).split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git("init", "-q", "-b", "main", cwd=dst)
    git("add", "-A", cwd=dst)
    git("commit", "-q", "-m", "clone", cwd=dst)
    return dst


def set_params(root: Path, updates: dict[str, dict]) -> None:
    """Deep-merge ``updates`` into ``root/params.yaml``."""

    def merge(base: dict, new: dict) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                merge(base[k], v)
            else:
                base[k] = v

    params = yaml.safe_load((root / "params.yaml").read_text())
    merge(params, updates)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for running the pipeline in ``root``: this venv, the clone's own stores, no outer servers."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "PYTHONPATH"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["GPTLAB_VENV"] = sys.prefix
    env["GPTLAB_SKIP_SETUP"] = "1"
    env["PREFECT_HOME"] = str(root / ".prefect")
    env.update(GIT_ENV)
    env.update(extra)
    return env


def run(cmd: list[str], root: Path, env: dict[str, str], timeout: int = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc
