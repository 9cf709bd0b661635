"""Export a gptlab checkpoint as a Hugging Face ``transformers`` model directory.

The inverse of :mod:`gptlab.formats.openai_gpt2` and :mod:`gptlab.formats.hf_read`: ``config.json``, ``model.safetensors``,
``generation_config.json`` and the tokenizer files, loadable with ``AutoModelForCausalLM.from_pretrained`` (or
``AutoModelForSequenceClassification`` for a ch. 6 classifier):

* ``architecture: gpt`` → ``GPT2LMHeadModel`` (``model_type: gpt2``). HF's GPT-2 keeps its projections as
  ``Conv1D`` ``(in, out)`` matrices, so gptlab's ``nn.Linear`` weights are transposed back; options GPT-2's
  config cannot say are expressed exactly (no bias = zero bias; an untied head = ``tie_word_embeddings:
  false``; padded vocabulary rows, which never produce a logit, are dropped).
* ``architecture: decoder`` → ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` / ``Gemma3ForCausalLM``: parameter
  names are already Hugging Face's; the config is :func:`gptlab.formats.hf_read.config_from_hf` run backwards.
* classifiers (``num_classes`` set, book ch. 6) → ``*ForSequenceClassification`` with the checkpoint's labels.
  gptlab classifies from the *last position* of an input right-padded to ``max_length``; HF pools the last
  token that is not ``pad_token_id``, so the export sets ``pad_token_id: -1`` (an id no input holds) and HF
  pools the last position too. HF's ``score`` layer has no bias: GPT-2's is folded exactly into the final
  LayerNorm's bias (which only the head reads); an RMSNorm has no bias, so a decoder classifier exports only
  when its head bias is zero.

Adapters a checkpoint keeps apart (LoRA with ``merge: false``) are merged first (:func:`gptlab.lora.merge_lora`).
The conversion (:func:`to_hf`) does no I/O; :func:`export_hf` reads the checkpoint and writes the directory
atomically (a temp sibling renamed into place), so a failed export leaves ``out`` as it was.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptlab.config import DecoderConfig, GPTConfig
from gptlab.errors import UserError
from gptlab.tokenizer import EOT_ID, VOCAB_SIZE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLASSIFIER_PAD = -1
"""``pad_token_id`` of an exported classifier: no input holds it, so HF pools the last position, as gptlab does."""
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_FAMILY = {  # family -> (model_type, causal-LM class, sequence-classification class)
    "llama": ("llama", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""Tokenizer files a ``"tokenizer": "hf"`` checkpoint stores, copied as they are."""


class HFExportError(UserError):
    """A checkpoint that cannot be exported as asked; the message names the file or option and why."""


@dataclass(frozen=True)
class SpecialTokens:
    """The ids ``config.json`` / ``generation_config.json`` record (from the checkpoint's tokenizer)."""

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    stop_ids: tuple[int, ...] = ()


@dataclass
class HFExport:
    """An exported model in memory: what goes into ``config.json``, ``model.safetensors`` and
    ``generation_config.json`` (``None`` for a classifier, which generates nothing)."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    generation: dict[str, Any] | None = field(default=None)


# ------------------------------------------------------------------------------------------------ GPT-2


def _gpt2_config(cfg: GPTConfig, tokens: SpecialTokens) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as gptlab's MLP
        "activation_function": "gelu_new",  # the tanh approximation gptlab uses
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": tokens.bos_id if tokens.bos_id is not None else EOT_ID,
        "eos_token_id": tokens.eos_id if tokens.eos_id is not None else EOT_ID,
        "tie_word_embeddings": cfg.tied,
    }


def _gpt2_state(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gptlab GPT names → HF GPT-2 names: Conv1D transposes, zero biases where gptlab has none, padded
    vocabulary rows dropped, a classifier head renamed ``score`` with its bias folded into ``ln_f.bias``."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("lm_head."):
            continue
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        elif name == "transformer.wte.weight":
            tensor = tensor[: cfg.vocab_size]  # padding rows never produce a logit nor get looked up
        out[name] = tensor.contiguous()
    C, ref = cfg.n_embd, state["transformer.wte.weight"]
    zeros = {"attn.c_attn.bias": 3 * C, "attn.c_proj.bias": C, "mlp.c_fc.bias": 4 * C, "mlp.c_proj.bias": C}
    zeros |= {"ln_1.bias": C, "ln_2.bias": C}
    for i in range(cfg.n_layer):
        for suffix, size in zeros.items():
            out.setdefault(f"transformer.h.{i}.{suffix}", ref.new_zeros(size))  # no bias = a zero bias
    out.setdefault("transformer.ln_f.bias", ref.new_zeros(C))
    if cfg.num_classes is not None:
        weight, bias = state["lm_head.weight"], state["lm_head.bias"]
        out["score.weight"] = weight.contiguous()
        out["transformer.ln_f.bias"] = _fold_bias(weight, bias, out["transformer.ln_f.bias"])
    elif not cfg.tied:
        out["lm_head.weight"] = state["lm_head.weight"][: cfg.vocab_size].contiguous()
    return out


def _fold_bias(weight: torch.Tensor, bias: torch.Tensor, norm_bias: torch.Tensor) -> torch.Tensor:
    """``norm_bias + d`` with ``weight @ d == bias``: the final norm feeds only the head, so shifting its bias
    by ``d`` adds ``bias`` to every logit and the head needs none (HF's ``score`` has none)."""
    w, b = weight.double(), bias.double()
    d = torch.linalg.pinv(w) @ b
    if not torch.allclose(w @ d, b, atol=1e-6 * max(1.0, float(b.abs().max()))):
        raise HFExportError(
            "lm_head.bias cannot be folded into the final LayerNorm (the head's rows are linearly dependent); "
            "HF's score layer has no bias"
        )
    return (norm_bias.double() + d).to(norm_bias.dtype)


# ------------------------------------------------------------------------------------------------ decoders


def _check_family(cfg: DecoderConfig) -> None:
    """Refuse options the target ``transformers`` class would compute differently, naming the option."""
    gemma = cfg.family == "gemma3"
    expected = {
        "norm_offset": 1.0 if gemma else 0.0,
        "sandwich_norm": gemma,
        "embed_scale": gemma,
        "qk_norm": cfg.family != "llama",
        "activation": "gelu_tanh" if gemma else "silu",
    }
    for option, want in expected.items():
        if getattr(cfg, option) != want:
            raise HFExportError(
                f"DecoderConfig.{option}={getattr(cfg, option)!r} cannot be expressed by transformers' "
                f"{_FAMILY[cfg.family][1]} (it needs {want!r})"
            )
    if not gemma:
        if cfg.query_pre_attn_scalar not in (None, cfg.head_size):
            raise HFExportError(
                f"DecoderConfig.query_pre_attn_scalar={cfg.query_pre_attn_scalar} is not expressible for "
                f"family {cfg.family!r} (only Gemma 3 scales queries by another number than head_size)"
            )
        if cfg.layer_types is not None and "sliding" in cfg.layer_types:
            raise HFExportError(
                f"DecoderConfig.layer_types has sliding-window layers, which family {cfg.family!r} cannot express"
            )


def _rope_parameters(theta: float, scaling: dict[str, float] | None) -> dict[str, Any]:
    """transformers' ``rope_parameters`` (the inverse of :func:`gptlab.formats.hf_read._rope`)."""
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    if "original_context_length" not in scaling:
        return {"rope_type": "linear", "rope_theta": theta, "factor": scaling["factor"]}
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": scaling["factor"],
        "low_freq_factor": scaling["low_freq_factor"],
        "high_freq_factor": scaling["high_freq_factor"],
        "original_max_position_embeddings": int(scaling["original_context_length"]),
    }


def _legacy_scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    """transformers 4's ``rope_scaling`` (also what llama.cpp's converter reads)."""
    rest = {k: v for k, v in params.items() if k != "rope_theta"}
    return None if rest.get("rope_type") == "default" else rest


def _decoder_config(cfg: DecoderConfig, tokens: SpecialTokens) -> dict[str, Any]:
    _check_family(cfg)
    config: dict[str, Any] = {
        "model_type": _FAMILY[cfg.family][0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": cfg.dropout,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": cfg.tied,
        "bos_token_id": tokens.bos_id,
        "eos_token_id": tokens.eos_id,
        "pad_token_id": tokens.pad_id,
    }
    full = _rope_parameters(cfg.rope_theta, cfg.rope_scaling)
    if cfg.family == "gemma3":
        types = cfg.layer_types or ("full",) * cfg.n_layer
        local = _rope_parameters(cfg.rope_local_theta or cfg.rope_theta, None)
        scalar = cfg.query_pre_attn_scalar or cfg.head_size
        if scalar != int(scalar):
            raise HFExportError(
                f"DecoderConfig.query_pre_attn_scalar={scalar} is not an integer, as Gemma3TextConfig requires"
            )
        config |= {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": int(scalar),
            "sliding_window": cfg.sliding_window,
            "layer_types": [f"{t}_attention" for t in types],
            "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "use_bidirectional_attention": False,
        }
        return config
    config |= {
        "hidden_act": "silu",
        "rope_parameters": full,
        "rope_theta": cfg.rope_theta,  # transformers 4 and llama.cpp read these two
        "rope_scaling": _legacy_scaling(full),
    }
    if cfg.family == "llama":
        config["mlp_bias"] = False
    else:
        config |= {"use_sliding_window": False, "sliding_window": None}
    return config


def _decoder_state(state: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Names are HF's already; a classifier head becomes ``score`` (biasless, so its bias must be zero)."""
    out = {k: v.contiguous() for k, v in state.items() if not k.startswith("lm_head.")}
    if cfg.num_classes is not None:
        bias = state["lm_head.bias"]
        if bias.abs().max() > 0:
            raise HFExportError(
                f"lm_head.bias is non-zero (max |b| {float(bias.abs().max()):.3g}), but transformers' "
                f"{_FAMILY[cfg.family][2]} score layer has no bias and an RMSNorm has none to fold it into"
            )
        out["score.weight"] = state["lm_head.weight"].contiguous()
    elif not cfg.tied:
        out["lm_head.weight"] = state["lm_head.weight"].contiguous()
    return out


# ------------------------------------------------------------------------------------------------ both


def to_hf(
    state: dict[str, torch.Tensor],
    checkpoint_config: dict[str, Any],
    tokens: SpecialTokens,
    *,
    dtype: torch.dtype | None = None,
) -> HFExport:
    """Convert a gptlab state dict (:func:`gptlab.checkpoint.model_state`, adapters merged) and its parsed
    ``config.json`` into Hugging Face's config and tensors. No I/O."""
    arch = checkpoint_config.get("architecture", "gpt")
    meta = checkpoint_config.get("meta") or {}
    if arch == "gpt":
        cfg: GPTConfig | DecoderConfig = GPTConfig.from_dict(checkpoint_config["model"])
        config, hf_state = _gpt2_config(cfg, tokens), _gpt2_state(state, cfg)
        classes = ("GPT2LMHeadModel", "GPT2ForSequenceClassification")
    elif arch == "decoder":
        cfg = DecoderConfig.from_dict(checkpoint_config["model"])
        config, hf_state = _decoder_config(cfg, tokens), _decoder_state(state, cfg)
        classes = _FAMILY[cfg.family][1:]
    else:
        raise HFExportError(f"architecture {arch!r} cannot be exported (gpt, decoder)")
    generation = None
    if cfg.num_classes is None:
        config["architectures"] = [classes[0]]
        stops = list(tokens.stop_ids) or [config["eos_token_id"]]
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": stops}
        pad = tokens.pad_id if tokens.pad_id is not None else config["eos_token_id"]
        generation["pad_token_id"] = pad
    else:
        labels = meta.get("labels") or [f"LABEL_{i}" for i in range(cfg.num_classes)]
        if len(labels) != cfg.num_classes:
            raise HFExportError(
                f"meta.labels has {len(labels)} names but the classifier head has {cfg.num_classes} classes"
            )
        config |= {
            "architectures": [classes[1]],
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)},
            "problem_type": "single_label_classification",
            "pad_token_id": CLASSIFIER_PAD,
        }
        if "max_length" in meta:
            config["gptlab_max_length"] = meta["max_length"]  # inputs right-padded to this, as gptlab feeds
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    first = next(iter(hf_state.values()))
    config["dtype"] = str(first.dtype).removeprefix("torch.")
    return HFExport(config=config, state=hf_state, generation=generation)


# ------------------------------------------------------------------------------------------------ tokenizer


@functools.cache
def gpt2_tokenizer_json() -> str:
    """GPT-2's tokenizer as a ``tokenizers`` JSON string, derived from the BPE file gptlab uses (tiktoken's
    ``r50k_base``, see :mod:`gptlab.tokenizer`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from gptlab.tokenizer import ENDOFTEXT, gpt2_vocab_and_merges

    vocab, merges = gpt2_vocab_and_merges()
    tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False))
    # ByteLevel's regex is GPT-2's split pattern, which tiktoken's r50k pattern splits identically.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tokenizer.to_str()


def _write_gpt2_tokenizer(directory: Path, *, max_length: int, classifier: bool) -> None:
    from gptlab.tokenizer import ENDOFTEXT

    text = gpt2_tokenizer_json()
    (directory / "tokenizer.json").write_text(text, encoding="utf-8")
    model = json.loads(text)["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(" ".join(m) if isinstance(m, list) else m for m in model["merges"])
    (directory / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "model_max_length": max_length,
    }
    if classifier:
        config["pad_token"] = ENDOFTEXT  # gptlab's classify pads with <|endoftext|>
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ writer


def _check_out(out: Path, checkpoint: Path) -> None:
    """``out`` may be absent, an empty directory, or an earlier export (replaced); nothing else is overwritten."""
    if not out.exists():
        return
    if out.resolve() == checkpoint.resolve():
        raise HFExportError(f"{out}: is the checkpoint itself; choose another output directory")
    if not out.is_dir():
        raise HFExportError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or "model_type" not in config or "format" in config:
        raise HFExportError(
            f"{out}: exists and is not an earlier Hugging Face export; refusing to replace it (remove it first)"
        )


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Write the gptlab checkpoint directory ``checkpoint`` as a Hugging Face model directory ``out``
    (replaced atomically; on any error ``out`` is left as it was). ``dtype``: ``float32``, ``bfloat16`` or
    ``float16`` (default: the checkpoint's). Returns ``out``."""
    from safetensors.torch import save_file

    from gptlab.checkpoint import CheckpointError, model_state
    from gptlab.fileio import atomic_dir
    from gptlab.load import load_checkpoint
    from gptlab.lora import merge_lora

    checkpoint, out = Path(checkpoint), Path(out)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise HFExportError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if not checkpoint.is_dir():
        raise HFExportError(f"{checkpoint}: not a checkpoint directory")
    _check_out(out, checkpoint)
    try:
        model, data = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise HFExportError(str(exc)) from None
    merge_lora(model)  # adapters stored apart (lora_merged false) become plain weights
    kind = data.get("tokenizer", "gpt2")
    classifier = model.config.num_classes is not None
    if kind == "hf":
        from gptlab.hf_tokenizer import HFTokenizer

        tok = HFTokenizer.from_dir(checkpoint)
        tokens = SpecialTokens(tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids)
    elif kind == "gpt2":
        if model.config.vocab_size != VOCAB_SIZE:
            raise HFExportError(
                f"{checkpoint / 'config.json'}: tokenizer 'gpt2' has {VOCAB_SIZE} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}; no tokenizer to export with it"
            )
        tokens = SpecialTokens(EOT_ID, EOT_ID, EOT_ID, (EOT_ID,))
    else:
        raise HFExportError(f"{checkpoint / 'config.json'}: unknown tokenizer {kind!r} (expected gpt2 or hf)")
    export = to_hf(model_state(model), data, tokens, dtype=dtype)
    del model
    with atomic_dir(out) as tmp:  # on any error `out` is left as it was
        save_file(export.state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(export.config, indent=2) + "\n")
        if export.generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(export.generation, indent=2) + "\n")
        if kind == "hf":
            for name in TOKENIZER_FILES:
                if (checkpoint / name).is_file():
                    shutil.copy2(checkpoint / name, tmp / name)
        else:
            max_length = data["model"].get("context_length", 1024)
            _write_gpt2_tokenizer(tmp, max_length=max_length, classifier=classifier)
    return out
