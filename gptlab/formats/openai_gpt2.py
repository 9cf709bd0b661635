"""Import OpenAI GPT-2 weights in the Hugging Face layout into a gptlab model.

The book (ch. 5, ``load_weights_into_gpt``) loads OpenAI's TensorFlow checkpoint; here we read the same weights
as published on the Hugging Face hub (``openai-community/gpt2*``, fetched with ``huggingface_hub``: cached,
resumable, revision-pinned, and sha256-checked here): ``config.json`` + ``model.safetensors`` or
``pytorch_model.bin`` (loaded with ``weights_only=True``). HF's GPT-2 stores its projections as ``Conv1D``
(``(in, out)`` matrices), so they are transposed into ``nn.Linear``'s ``(out, in)``; the LM head is tied to the
token embedding as in GPT-2.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gptlab.config import GPTConfig
from gptlab.errors import UserError
from gptlab.fileio import read_json_object
from gptlab.model import GPT

HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Conv1D weights, stored (in, out) by Hugging Face; nn.Linear wants (out, in).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers older HF checkpoints carry (the causal mask); we build masks on the fly.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class WeightImportError(UserError):
    """The source is not a GPT-2 checkpoint we can read; the message names the file and the problem."""


def config_from_hf(hf: dict, *, name: str = "gpt2", source: str = "config.json") -> GPTConfig:
    """Map a Hugging Face ``GPT2Config`` dict to :class:`GPTConfig`."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise WeightImportError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise WeightImportError(f"{source}: {flag}=true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise WeightImportError(f"{source}: scale_attn_weights=false is not supported")
    try:
        return GPTConfig(
            name=name,
            vocab_size=hf["vocab_size"],
            context_length=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            qkv_bias=True,
            bias=True,
            tie_weights=hf.get("tie_word_embeddings", True),
        )
    except KeyError as exc:
        raise WeightImportError(f"{source}: missing field {exc.args[0]!r}") from None


def convert_state_dict(
    hf_state: dict[str, torch.Tensor], config: GPTConfig, *, source: str
) -> dict[str, torch.Tensor]:
    """Rename/transpose HF GPT-2 tensors into gptlab's names (which are GPT-2's, minus Conv1D)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name == "lm_head.weight" and config.tied:
            if not torch.equal(
                tensor, hf_state.get("transformer.wte.weight", hf_state.get("wte.weight", tensor))
            ):
                raise WeightImportError(
                    f"{source}: lm_head.weight differs from wte.weight but the config ties them"
                )
            continue
        if name.endswith(_TRANSPOSED):
            tensor = tensor.t()
        out[name] = tensor.contiguous().float()
    return out


def read_weights(path: str | Path) -> dict[str, Any]:
    """A safetensors file, or a torch file loaded with ``weights_only=True`` (a pickle that would run code is
    refused); any failure is one :class:`WeightImportError` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightImportError(f"{path}: not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing; the refusal below says all that matters.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/pickle raise many types for a bad file
        raise WeightImportError(f"{path}: {_load_failure(exc)}") from None


def _load_failure(exc: Exception) -> str:
    """One line for a weights file that would not load; a pickle needing code is named as the refusal it is."""
    text = " ".join(str(exc).split())
    if "Weights only load failed" in text:
        return (
            "refused: unpickling it would run code (it is loaded with weights_only=True); "
            "use model.safetensors or a plain tensor state dict"
        )
    return f"not a readable weights file ({text.split('. ')[0].rstrip('.')})"


def load_hf_gpt2(src: str | Path, *, name: str | None = None) -> GPT:
    """Build a gptlab GPT from a Hugging Face GPT-2 directory (``config.json`` + weights)."""
    src = Path(src)
    if not src.is_dir():
        raise WeightImportError(
            f"{src}: expected a directory with config.json and model.safetensors/pytorch_model.bin"
        )
    cfg_path = src / "config.json"
    hf_cfg = read_json_object(cfg_path, error=WeightImportError, what="a GPT2Config")
    config = config_from_hf(hf_cfg, name=name or src.name, source=str(cfg_path))
    weights = next((src / f for f in ("model.safetensors", "pytorch_model.bin") if (src / f).is_file()), None)
    if weights is None:
        raise WeightImportError(f"{src}: no model.safetensors or pytorch_model.bin")
    state = convert_state_dict(read_weights(weights), config, source=str(weights))
    model = GPT(config)
    from gptlab.checkpoint import CheckpointError, load_state

    try:
        load_state(model, state, source=str(weights))
    except CheckpointError as exc:
        raise WeightImportError(str(exc)) from None
    return model.eval()


def download_gpt2(
    model_name: str,
    cache_dir: str | Path | None = None,
    *,
    endpoint: str | None = None,
    revision: str = "main",
    progress: bool = True,
) -> Path:
    """Download ``config.json`` + ``model.safetensors`` of a GPT-2 size from the hub, sha256-verified
    (:mod:`gptlab.formats.hub`); returns their directory. Offline this fails with one line naming the URL; pass a local
    directory to :func:`load_hf_gpt2` instead."""
    from gptlab.formats.hub import HubError, download_files

    repo = HF_REPOS.get(model_name, model_name)
    if "/" not in repo:
        raise WeightImportError(f"unknown GPT-2 model {model_name!r}; choose one of: {', '.join(HF_REPOS)}")
    try:
        return download_files(
            repo,
            ["config.json", "model.safetensors"],
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            progress=progress,
        )
    except HubError as exc:
        raise WeightImportError(str(exc)) from None


def resolve_source(src: str | Path, *, endpoint: str | None = None, progress: bool = True) -> Path:
    """A local HF directory as given, or the download directory for a model name (``gpt2-small``…)."""
    path = Path(src)
    if path.exists():
        return path
    if str(src) in HF_REPOS or str(src).startswith("openai-community/"):
        return download_gpt2(str(src), endpoint=endpoint, progress=progress)
    raise WeightImportError(f"{src}: neither an existing directory nor a model name ({', '.join(HF_REPOS)})")
