"""Models and tokenizers from checkpoint directories (:mod:`gptlab.checkpoint` holds the layout and the writer).

Loading builds the model on the meta device and assigns the tensors read from the file, so the weights are in
memory once. A checkpoint that keeps LoRA adapters separate (``meta.lora``, not merged) gets its LoRA layers
rebuilt first (Hu et al., 2021; book appendix E).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptlab.checkpoint import WEIGHTS, CheckpointError, load_state, read_config
from gptlab.config import DecoderConfig, GPTConfig
from gptlab.errors import UserError
from gptlab.llama import Decoder
from gptlab.model import GPT

ARCHITECTURES: dict[str, tuple[type, type]] = {"gpt": (GPTConfig, GPT), "decoder": (DecoderConfig, Decoder)}
"""``config.json``'s ``architecture`` -> (config class, model class); absent means ``gpt``."""


def model_from_config(data: dict[str, Any], *, device: torch.device | str | None = None) -> GPT | Decoder:
    """An (initialised) model for a checkpoint's parsed ``config.json``; ``device="meta"`` allocates nothing."""
    config_cls, model_cls = ARCHITECTURES[data.get("architecture", "gpt")]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return model_cls(config_cls.from_dict(data["model"]))


def load_checkpoint(
    directory: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT | Decoder, dict[str, Any]]:
    """Build the model from ``config.json`` and load ``model.safetensors``; returns (model, config dict)."""
    directory = Path(directory)
    data = read_config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found")
    model = model_from_config(data, device="meta")
    lora_cfg = data.get("meta", {}).get("lora")
    if lora_cfg and not data["meta"].get("lora_merged", False):
        from gptlab.lora import apply_lora  # adapters kept separate: rebuild the LoRA layers first

        with torch.device("meta"):
            apply_lora(model, **lora_cfg)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from None
    load_state(model, state, source=str(weights))
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    return model, data


def load_tokenizer(checkpoint: str | Path):
    """The tokenizer a gptlab checkpoint records: GPT-2's (tiktoken) or the model's own (its files beside the
    weights)."""
    kind = read_config(checkpoint).get("tokenizer", "gpt2")
    if kind == "gpt2":
        from gptlab.tokenizer import GPT2Tokenizer

        return GPT2Tokenizer()
    if kind == "hf":
        from gptlab.hf_tokenizer import HFTokenizer

        return HFTokenizer.from_dir(checkpoint)
    raise UserError(f"{Path(checkpoint) / 'config.json'}: unknown tokenizer {kind!r} (expected gpt2 or hf)")
