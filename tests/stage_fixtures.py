"""Tiny checkpoints and train settings shared by the stage-function tests (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path

import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def tiny_checkpoint(path: Path, **meta) -> Path:
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig.from_name("gpt-micro", n_layer=1)), path, meta=meta or None)
    return path


def tiny_chat_checkpoint(path: Path, **meta) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer and ChatML template (:mod:`tiny_gguf`), imported
    from GGUF as a user's model would be."""
    from tiny_gguf import tiny_llama, write_llama_gguf

    from gptlab.formats.gguf_read import load_gguf

    path.mkdir(parents=True, exist_ok=True)
    gguf = write_llama_gguf(tiny_llama(context_length=512), path.parent / f"{path.name}.gguf")
    model, tokenizer = load_gguf(gguf)
    save_checkpoint(model, path, tokenizer=tokenizer, meta=meta or None)
    return path


def quick_train(**overrides) -> TrainConfig:
    settings = dict(
        max_steps=3, warmup_steps=0, eval_interval=2, eval_batches=2, log_interval=1, progress=False
    )
    return TrainConfig(**{**settings, **overrides})
