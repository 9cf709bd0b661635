"""Import Hugging Face Llama / SmolLM2, Qwen3 and Gemma 3 checkpoints into :class:`gptlab.llama.Decoder`.

A model directory holds ``config.json`` and its weights as one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``; a hub repo id is fetched with ``huggingface_hub`` (cached, resumable,
revision-pinned, each LFS file checked against the sha256 the hub publishes as its ETag). Parameter names are
Hugging Face's, so the state dict maps one to one.

Loading follows the book's memory-efficient-loading bonus: the model is built on the ``meta`` device (no
weights allocated), each tensor is read from the memory-mapped safetensors file and *assigned* into place, so the
weights exist once in RAM, never twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gptlab.config import DecoderConfig
from gptlab.errors import UserError
from gptlab.fileio import read_json_object
from gptlab.llama import Decoder

MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3", "gemma3_text": "gemma3"}
"""Hugging Face ``model_type`` -> :class:`DecoderConfig` family."""
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


class HFImportError(UserError):
    """A source that is not a supported Hugging Face model; the message names the file and the problem."""


def _rope(params: dict[str, Any], source: str) -> tuple[float, dict[str, float] | None]:
    """(theta, scaling) from a flat ``rope_parameters`` dict (transformers 5) or legacy fields."""
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"factor": float(params["factor"])}
    if kind == "llama3":
        return theta, {
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_context_length": float(params["original_max_position_embeddings"]),
        }
    raise HFImportError(f"{source}: rope_type {kind!r} is not supported (default, linear, llama3)")


def _legacy_rope(hf: dict, theta_key: str = "rope_theta", default: float = 10000.0) -> dict[str, Any]:
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get(theta_key, default))
    if params.get("rope_type", params.get("type")) == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return params


def config_from_hf(hf: dict, *, name: str = "custom", source: str = "config.json") -> DecoderConfig:
    """Map a Hugging Face ``LlamaConfig`` / ``Qwen3Config`` / ``Gemma3TextConfig`` dict to :class:`DecoderConfig`."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise HFImportError(
            f"{source}: model_type {model_type!r} is not supported; expected one of {', '.join(MODEL_TYPES)} "
            "(or gpt2, through import-gpt2)"
        )
    family = MODEL_TYPES[model_type]
    try:
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        common = dict(
            family=family,
            name=name,
            vocab_size=hf["vocab_size"],
            context_length=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=n_embd,
            head_size=hf.get("head_dim") or n_embd // n_head,
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            attention_bias=hf.get("attention_bias", False),
            tie_weights=hf.get("tie_word_embeddings", family == "gemma3"),
        )
        act = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
        if family == "gemma3":
            rope = hf.get("rope_parameters") or {
                "full_attention": _legacy_rope(hf, "rope_theta", 1e6),
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": hf.get("rope_local_base_freq", 1e4),
                },
            }
            theta, scaling = _rope(rope["full_attention"], source)
            local, local_scaling = _rope(rope["sliding_attention"], source)
            if local_scaling:
                raise HFImportError(f"{source}: RoPE scaling on sliding-window layers is not supported")
            types = hf.get("layer_types")
            if types is None:
                every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
                types = [
                    "full_attention" if (i + 1) % every == 0 else "sliding_attention"
                    for i in range(common["n_layer"])
                ]
            if hf.get("final_logit_softcapping") or hf.get("use_bidirectional_attention"):
                raise HFImportError(
                    f"{source}: final_logit_softcapping / bidirectional attention is not supported"
                )
            return DecoderConfig(
                **common,
                activation=_activation(act, source),
                norm_offset=1.0,
                rope_theta=theta,
                rope_scaling=scaling,
                rope_local_theta=local,
                qk_norm=True,
                sandwich_norm=True,
                embed_scale=True,
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", common["head_size"])),
                sliding_window=hf.get("sliding_window"),
                layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in types),
            )
        if hf.get("mlp_bias"):
            raise HFImportError(f"{source}: mlp_bias=true is not supported")
        if family == "qwen3" and hf.get("use_sliding_window"):
            raise HFImportError(f"{source}: use_sliding_window=true is not supported")
        theta, scaling = _rope(hf.get("rope_parameters") or _legacy_rope(hf), source)
        return DecoderConfig(
            **common,
            activation=_activation(act, source),
            rope_theta=theta,
            rope_scaling=scaling,
            qk_norm=family == "qwen3",
        )
    except KeyError as exc:
        raise HFImportError(f"{source}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, HFImportError):
            raise
        raise HFImportError(f"{source}: {exc}") from None


def _activation(act: str, source: str) -> str:
    if act == "silu":
        return "silu"
    if act in ("gelu_pytorch_tanh", "gelu_new"):
        return "gelu_tanh"
    raise HFImportError(f"{source}: hidden activation {act!r} is not supported (silu, gelu_pytorch_tanh)")


def read_hf_config(src: Path) -> dict:
    return read_json_object(src / "config.json", error=HFImportError)


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of a model directory: one file, or the shards its index lists."""
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    index = src / "model.safetensors.index.json"
    if not index.is_file():
        raise HFImportError(f"{src}: no model.safetensors or model.safetensors.index.json")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise HFImportError(f"{index}: not a safetensors index ({exc})") from None
    files = [src / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise HFImportError(f"{index}: lists shard(s) that are not there: {', '.join(missing)}")
    return files


def assign_state(model: torch.nn.Module, tensors, *, source: str) -> None:
    """Put ``(name, tensor)`` pairs into a model built on the meta device: the tensors become its parameters
    (no copy), after :func:`gptlab.checkpoint.load_state` checked every name and shape."""
    from gptlab.checkpoint import load_state

    state = dict(tensors)
    if model.config.tied:
        state.pop("lm_head.weight", None)  # some exports store the tied head as well
    load_state(model, state, source=source)


def load_hf_decoder(
    src: str | Path, *, name: str | None = None, dtype: torch.dtype = torch.float32
) -> Decoder:
    """Build a :class:`Decoder` from a Hugging Face model directory (weights assigned, never copied twice)."""
    src = Path(src)
    if not src.is_dir():
        raise HFImportError(f"{src}: expected a Hugging Face model directory (config.json + safetensors)")
    config = config_from_hf(read_hf_config(src), name=name or src.name, source=str(src / "config.json"))
    files = weight_files(src)
    with torch.device("meta"):
        model = Decoder(config)

    def tensors():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, f.get_tensor(key).to(dtype)

    assign_state(model, tensors(), source=str(src))
    return model.eval()
