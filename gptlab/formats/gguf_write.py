"""Export a gptlab checkpoint as a GGUF file (llama.cpp / Ollama's format), with an Ollama ``Modelfile``.

Follows llama.cpp's ``convert_hf_to_gguf.py`` conventions, written with the ``gguf`` package (``GGUFWriter``,
``gguf.quants.quantize``):

* GPT-2 checkpoints (``architecture: gpt``) -> llama.cpp's ``gpt2`` architecture: ``token_embd``,
  ``position_embd``, ``blk.N.attn_qkv`` / ``attn_output`` / ``ffn_up`` / ``ffn_down`` / ``attn_norm`` /
  ``ffn_norm`` (weights and biases; a bias-free gptlab model gets zero biases, which llama.cpp requires),
  ``output_norm``, ``output`` when the head is not tied. gptlab's ``nn.Linear`` weights are already (out, in),
  the layout llama.cpp's converter produces by transposing Hugging Face's ``Conv1D``.
* :class:`gptlab.llama.Decoder` checkpoints -> ``llama`` (Llama 3.x, SmolLM2; query/key rows interleaved for
  llama.cpp's RoPE, the inverse of :func:`gptlab.formats.gguf_read._unpermute`; Llama 3.1+ frequency scaling as the
  ``rope_freqs`` tensor), ``qwen3`` or ``gemma3`` (norm weights stored as ``1 + w``), named as
  :mod:`gptlab.formats.gguf_read` reads them back.
* Tokenizer metadata (``tokenizer.ggml.*``): byte-level BPE (``gpt2``) tokens, token types, merges, special ids,
  ``tokenizer.ggml.pre`` and the chat template. GPT-2's vocabulary and merges are recovered from tiktoken's
  ranks the way llama.cpp's converter does for tiktoken vocabularies; Hugging Face tokenizers come from the
  checkpoint's ``tokenizer.json``.

Matrices are stored in ``qtype`` (``f32``, ``f16``, ``bf16`` or a block type the ``gguf`` package can quantize),
1-D tensors (norms, biases) in F32 as llama.cpp does, and a matrix whose rows do not split into whole blocks
in F16. The mapping (:func:`prepare`) is separate from the writing (:func:`write_gguf`); the Modelfile is
:mod:`gptlab.formats.modelfile`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.errors import UserError
from gptlab.fileio import atomic_write, write_text
from gptlab.formats.gguf_names import DECODER_BLOCK, DECODER_TENSORS

QTYPES: dict[str, tuple[str, str]] = {
    # name -> (GGMLQuantizationType, LlamaFileType): every type gguf.quants can write that llama.cpp loads.
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
"""``qtype`` names accepted by :func:`export_gguf`."""

_CONTROL, _NORMAL, _USER_DEFINED, _UNUSED = 3, 1, 4, 5  # llama.cpp's token types


class GGUFExportError(UserError):
    """A checkpoint or option that cannot be exported to GGUF; the message names what and why."""


@dataclass
class GGUFModel:
    """What goes into a GGUF file: architecture, key/values (in order) and tensors (llama.cpp's names and
    layout, float32)."""

    arch: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[tuple[str, np.ndarray]] = field(default_factory=list)
    context_length: int = 0
    chat_template: str | None = None
    stop_tokens: list[str] = field(default_factory=list)
    """Texts of the tokens that end a reply (EOS, end-of-turn), for the Modelfile's ``stop`` parameters."""


# ---------------------------------------------------------------- tokenizers


def gpt2_vocabulary() -> tuple[list[str], list[str]]:
    """(tokens by id, merges ``"a b"`` in rank order): GPT-2's BPE as GGUF's ``tokenizer.ggml.*`` lists hold it
    (:func:`gptlab.tokenizer.gpt2_vocab_and_merges`)."""
    from gptlab.tokenizer import gpt2_vocab_and_merges

    vocab, merges = gpt2_vocab_and_merges()
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    return tokens, [f"{a} {b}" for a, b in merges]


def _gpt2_tokenizer_metadata() -> tuple[dict[str, Any], list[str]]:
    from gptlab.tokenizer import EOT_ID

    tokens, merges = gpt2_vocabulary()
    types = [_NORMAL] * len(tokens)
    types[EOT_ID] = _CONTROL
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": EOT_ID,
        "tokenizer.ggml.eos_token_id": EOT_ID,
        "tokenizer.ggml.padding_token_id": EOT_ID,
        "tokenizer.ggml.add_bos_token": False,
    }
    return meta, [tokens[EOT_ID]]


def pre_tokenizer_name(pre: dict | None, *, source: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a ``tokenizer.json`` pre-tokenizer (byte-level BPE only).

    llama.cpp picks the name by hashing the encoding of a probe text; the same families are told apart here by
    the split they declare: GPT-2's regex (ByteLevel alone), SmolLM's single digits before it, or the
    Llama 3 / Qwen2 regex (the same tables :mod:`gptlab.hf_tokenizer` reads back).
    """
    from gptlab.hf_tokenizer import GGUF_SPLITS

    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex == GGUF_SPLITS[name]:
                return name
    raise GGUFExportError(
        f"{source}: pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp name this exporter knows "
        "(byte-level BPE with GPT-2's, SmolLM's, Llama 3's or Qwen2's split)"
    )


def _hf_tokenizer_metadata(directory: Path, n_vocab: int) -> tuple[dict[str, Any], list[str]]:
    """Tokenizer key/values of a checkpoint's ``tokenizer.json`` (+ special tokens and template), padded to the
    model's ``n_vocab`` rows with ``[PADi]`` unused tokens as llama.cpp's converter pads."""
    from gptlab.hf_tokenizer import HFTokenizer

    source = str(directory / "tokenizer.json")
    tok = HFTokenizer.from_dir(directory)
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError(
            f"{source}: only byte-level BPE tokenizers can be exported (tokenizer.ggml.model 'gpt2'); this one is "
            f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder"
        )
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), source=source)
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise GGUFExportError(f"{source}: {len(vocab)} tokens, but the model has {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, _NORMAL
    for i, added in tok.tokenizer.get_added_tokens_decoder().items():
        types[i] = _CONTROL if added.special else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = value
    unk = tok.special.get("unk_token")
    if unk is not None and unk in vocab:  # byte-level BPE needs none; some tokenizers name one anyway
        meta["tokenizer.ggml.unknown_token_id"] = vocab[unk]
    # Whether plain encoding starts with BOS (Llama 3, Gemma): llama.cpp and transformers read this flag.
    probe = tok.encode("a")
    meta["tokenizer.ggml.add_bos_token"] = tok.bos_id is not None and probe[:1] == [tok.bos_id]
    turn_end = [i for i in tok.stop_ids if i != tok.eos_id]
    if turn_end:
        meta["tokenizer.ggml.eot_token_id"] = turn_end[0]
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta, [tokens[i] for i in tok.stop_ids]


# ---------------------------------------------------------------- weights


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (``LlamaModel.permute``): interleave each head's two rotary halves, the inverse of
    :func:`gptlab.formats.gguf_read._unpermute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gpt2_tensors(model, cfg) -> Iterator[tuple[str, np.ndarray]]:
    state = model.state_dict()
    n = cfg.n_embd

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        # bias=False / qkv_bias=False models have no bias: llama.cpp's gpt2 graph requires one, zeros are exact.
        return _np(state[name]) if name in state else np.zeros(shape, np.float32)

    yield "token_embd.weight", _np(state["transformer.wte.weight"][: cfg.vocab_size])  # drop padding rows
    yield "position_embd.weight", _np(state["transformer.wpe.weight"])
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for gguf_name, ours, width in (
            ("attn_norm", "ln_1", n),
            ("attn_qkv", "attn.c_attn", 3 * n),
            ("attn_output", "attn.c_proj", n),
            ("ffn_norm", "ln_2", n),
            ("ffn_up", "mlp.c_fc", 4 * n),
            ("ffn_down", "mlp.c_proj", n),
        ):
            yield f"blk.{i}.{gguf_name}.weight", _np(state[p + ours + ".weight"])
            yield f"blk.{i}.{gguf_name}.bias", get(p + ours + ".bias", (width,))
    yield "output_norm.weight", _np(state["transformer.ln_f.weight"])
    yield "output_norm.bias", get("transformer.ln_f.bias", (n,))
    if not cfg.tied:
        yield "output.weight", _np(state["lm_head.weight"][: cfg.vocab_size])


_GGUF_NAMES = {hf: g for g, hf in DECODER_TENSORS.items()}
_GGUF_BLOCK = {hf: g for g, hf in DECODER_BLOCK.items()}


def _decoder_tensors(model, cfg) -> Iterator[tuple[str, np.ndarray]]:
    arch = cfg.family
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tied:
            continue
        w = _np(tensor)
        if name in _GGUF_NAMES:
            gguf_name = _GGUF_NAMES[name]
        else:
            _, _, layer, *rest = name.split(".")  # model.layers.N.<module>.weight
            module = ".".join(rest[:-1])
            if module == ("pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"):
                kind = "ffn_norm"  # the norm before the MLP (see gptlab.formats.gguf_read.hf_name)
            elif module in _GGUF_BLOCK:
                kind = _GGUF_BLOCK[module]
            else:
                raise GGUFExportError(f"tensor {name!r} has no llama.cpp {arch} counterpart")
            gguf_name = f"blk.{layer}.{kind}.weight"
            if arch == "llama" and kind == "attn_q":
                w = _permute(w, cfg.n_head)
            elif arch == "llama" and kind == "attn_k":
                w = _permute(w, cfg.n_kv_head)
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            w = w + 1.0  # llama.cpp stores Gemma's scale as 1 + w
        yield gguf_name, w
    if arch == "llama" and cfg.rope_scaling and "original_context_length" in cfg.rope_scaling:
        # llama.cpp applies Llama 3.1+ scaling as per-frequency divisors (convert_hf_to_gguf's rope_freqs).
        from gptlab.llama import rope_frequencies

        plain = rope_frequencies(cfg.head_size, cfg.rope_theta)
        scaled = rope_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
        yield "rope_freqs.weight", _np(plain / scaled)


def _check_decoder(cfg, source: str) -> None:
    """Refuse configurations llama.cpp's architecture of that name cannot express."""
    problems = []
    if cfg.attention_bias:
        problems.append("attention biases")
    if cfg.family in ("llama", "qwen3") and (
        cfg.sandwich_norm or cfg.embed_scale or cfg.norm_offset or cfg.activation != "silu"
    ):
        problems.append("Gemma-style norms/embedding scale/activation")
    if cfg.family == "llama" and cfg.qk_norm:
        problems.append("query/key norms (llama has none)")
    if cfg.family == "qwen3" and not cfg.qk_norm:
        problems.append("no query/key norms (qwen3 has them)")
    if cfg.family in ("llama", "qwen3") and (cfg.sliding_window or cfg.layer_types):
        problems.append("sliding-window layers")
    if cfg.family == "qwen3" and cfg.rope_scaling:
        problems.append("RoPE scaling on qwen3")
    if cfg.family == "gemma3":
        every = ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(cfg.n_layer)]
        if list(cfg.layer_types or []) != every:
            problems.append("a layer pattern other than llama.cpp's five sliding + one global")
        if cfg.query_pre_attn_scalar not in (None, float(cfg.head_size)):
            problems.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} != head size")
        if cfg.rope_local_theta not in (None, 10000.0):
            problems.append("a local RoPE base other than 10000")
        if cfg.rope_scaling and set(cfg.rope_scaling) != {"factor"}:
            problems.append("RoPE scaling other than linear")
    if problems:
        raise GGUFExportError(f"{source}: {cfg.family} model with {', '.join(problems)} cannot be exported")


def _metadata(arch: str, cfg, name: str, file_type: int) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": name,
        "general.file_type": file_type,
        f"{arch}.context_length": cfg.context_length,
        f"{arch}.embedding_length": cfg.n_embd,
        f"{arch}.block_count": cfg.n_layer,
        f"{arch}.attention.head_count": cfg.n_head,
    }
    if arch == "gpt2":
        meta[f"{arch}.feed_forward_length"] = 4 * cfg.n_embd
        meta[f"{arch}.attention.layer_norm_epsilon"] = float(cfg.layer_norm_eps)
        return meta
    meta[f"{arch}.feed_forward_length"] = cfg.intermediate_size
    meta[f"{arch}.attention.head_count_kv"] = cfg.n_kv_head
    meta[f"{arch}.attention.layer_norm_rms_epsilon"] = float(cfg.rms_norm_eps)
    meta[f"{arch}.rope.freq_base"] = float(cfg.rope_theta)
    meta[f"{arch}.vocab_size"] = cfg.vocab_size
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = cfg.head_size
    else:  # qwen3 / gemma3 heads are not n_embd / n_head wide
        meta[f"{arch}.attention.key_length"] = cfg.head_size
        meta[f"{arch}.attention.value_length"] = cfg.head_size
    if cfg.rope_scaling and set(cfg.rope_scaling) == {"factor"}:
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(cfg.rope_scaling["factor"])
    if arch == "gemma3":
        meta[f"{arch}.attention.sliding_window"] = cfg.sliding_window
    return meta


def prepare(checkpoint: str | Path, *, qtype: str = "f16") -> GGUFModel:
    """Everything the GGUF file of ``checkpoint`` holds, in memory (no file written)."""
    from gptlab.checkpoint import read_config
    from gptlab.load import load_checkpoint

    if qtype not in QTYPES:
        raise GGUFExportError(f"qtype {qtype!r} is not supported; choose one of: {', '.join(QTYPES)}")
    import gguf

    checkpoint = Path(checkpoint)
    data = read_config(checkpoint)
    source = str(checkpoint / "config.json")
    if data["model"].get("num_classes") is not None:
        raise GGUFExportError(
            f"{source}: a classifier checkpoint ({data['model']['num_classes']} classes) cannot be exported; "
            "GGUF/Ollama serve text generation models"
        )
    model, data = load_checkpoint(checkpoint)
    meta = data.get("meta") or {}
    if meta.get("lora") and not meta.get("lora_merged", False):
        from gptlab.lora import merge_lora

        merge_lora(model)
    cfg = model.config
    file_type = int(getattr(gguf.LlamaFileType, QTYPES[qtype][1]))
    name = cfg.name if cfg.name != "custom" else checkpoint.name
    kind = data.get("tokenizer", "gpt2")
    if data.get("architecture", "gpt") == "gpt":
        from gptlab.tokenizer import VOCAB_SIZE

        if kind != "gpt2" or cfg.vocab_size != VOCAB_SIZE:
            raise GGUFExportError(
                f"{source}: a GPT model needs GPT-2's tokenizer and {VOCAB_SIZE} tokens to export, "
                f"got tokenizer {kind!r} with vocab_size {cfg.vocab_size}"
            )
        arch, tensors = "gpt2", list(_gpt2_tensors(model, cfg))
        token_meta, stops = _gpt2_tokenizer_metadata()
        template = None
    else:
        _check_decoder(cfg, source)
        if kind != "hf":
            raise GGUFExportError(f"{source}: tokenizer {kind!r}; a decoder exports its own ('hf') tokenizer")
        arch, tensors = cfg.family, list(_decoder_tensors(model, cfg))
        token_meta, stops = _hf_tokenizer_metadata(checkpoint, cfg.vocab_size)
        template = token_meta.get("tokenizer.chat_template")
    del model
    return GGUFModel(
        arch=arch,
        metadata={**_metadata(arch, cfg, name, file_type), **token_meta},
        tensors=tensors,
        context_length=cfg.context_length,
        chat_template=template,
        stop_tokens=stops,
    )


def tensor_type(name: str, w: np.ndarray, qtype: str):
    """The GGML type a tensor is stored in: 1-D in F32, matrices in ``qtype`` when their rows split into whole
    blocks, else F16 (llama.cpp's fallback)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    want = getattr(GGMLQuantizationType, QTYPES[qtype][0])
    if w.ndim < 2 or name == "rope_freqs.weight":
        return GGMLQuantizationType.F32
    if w.shape[-1] % GGML_QUANT_SIZES[want][0]:
        return GGMLQuantizationType.F16
    return want


def write_gguf(model: GGUFModel, path: str | Path, *, qtype: str) -> None:
    """Write ``model`` to ``path`` (not atomic by itself: :func:`export_gguf` writes to a temp file)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), model.arch)
    try:
        _write(writer, model, qtype)
    finally:
        writer.close()


def _write(writer, model: GGUFModel, qtype: str) -> None:
    import gguf
    from gguf.quants import quantize

    for key, value in model.metadata.items():
        if key == "general.architecture":
            continue  # the writer adds it
        if key == "tokenizer.ggml.token_type":
            writer.add_token_types(value)  # INT32, as llama.cpp reads it
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, w in model.tensors:
        kind = tensor_type(name, w, qtype)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        else:
            writer.add_tensor(name, quantize(np.ascontiguousarray(w), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()


def modelfile_path(out: str | Path) -> Path:
    """Where :func:`export_gguf` writes the Modelfile: ``NAME.Modelfile`` beside ``NAME.gguf``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.Modelfile")


def export_gguf(
    checkpoint: str | Path, out: str | Path, *, qtype: str = "f16", modelfile: bool = True
) -> Path:
    """Write ``checkpoint`` as the GGUF file ``out`` (atomically) and, with ``modelfile``, an Ollama Modelfile
    beside it (:func:`modelfile_path`); returns ``out``."""
    from gptlab.formats.modelfile import render_modelfile

    out = Path(out)
    model = prepare(checkpoint, qtype=qtype)
    atomic_write(out, lambda tmp: write_gguf(model, tmp, qtype=qtype))
    if modelfile:
        write_text(
            modelfile_path(out),
            render_modelfile(
                out.name,
                chat_template=model.chat_template,
                stop_tokens=model.stop_tokens,
                context_length=model.context_length,
            ),
        )
    return out
