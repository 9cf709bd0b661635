"""Import GGUF files (llama.cpp / Ollama's format) into :class:`gptlab.llama.Decoder`, with their tokenizer.

Read with the ``gguf`` package (``GGUFReader``: the file is memory-mapped) and dequantized through it
(``gguf.quants.dequantize``: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x, Q2_K…Q6_K and the IQ types), one tensor at a
time, each assigned into a model built on the meta device, so the float32 weights exist once in RAM.

llama.cpp's names map to Hugging Face's (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``);
two conversions of llama.cpp's own undone as ``transformers`` undoes them: Llama's query/key rows are stored
interleaved for llama.cpp's RoPE and are permuted back to the rotate-half layout, and Gemma's norm weights are
stored as ``1 + w``. Supported architectures: ``llama`` (Llama 3.x, SmolLM2), ``qwen3``, ``gemma3``, and ``gpt2``
into :class:`gptlab.model.GPT` (GPT-2's tensors are stored as torch's ``(out, in)``: nothing to undo), with
tiktoken's GPT-2 tokenizer when the file's vocabulary is GPT-2's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.config import DecoderConfig, GPTConfig
from gptlab.errors import UserError
from gptlab.formats.gguf_names import DECODER_BLOCK, DECODER_TENSORS, GPT2_BLOCK, GPT2_TENSORS
from gptlab.formats.hf_read import assign_state
from gptlab.hf_tokenizer import HFTokenizer
from gptlab.llama import Decoder
from gptlab.model import GPT
from gptlab.tokenizer import ENDOFTEXT, EOT_ID, VOCAB_SIZE, GPT2Tokenizer

ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3", "gemma3": "gemma3"}


class GGUFImportError(UserError):
    """A GGUF file that cannot be imported; the message names the file and the problem."""


def _reader(path: Path):
    """``gguf.GGUFReader`` over a plain ndarray view of its memory map.

    The reader slices its ``np.memmap`` once per key, token and merge string; every slice of a memmap runs its
    Python-level ``__array_finalize__``, ~3 s for GPT-2's 50k-token vocabulary. Slices of an ndarray view of the
    same mapping are the same bytes, read at a third of the time.
    """
    from gguf import GGUFReader

    class Reader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            if "_plain" not in self.__dict__:
                self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = self._plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(
                arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order)
            )

    return Reader(str(path), "r")


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value of a ``GGUFReader`` as Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def gpt2_config_from_gguf(meta: dict[str, Any], *, name: str = "custom", source: str = "GGUF") -> GPTConfig:
    """The :class:`GPTConfig` of a ``gpt2`` GGUF file (biases everywhere, as llama.cpp's graph has them)."""

    def get(key: str) -> Any:
        if f"gpt2.{key}" not in meta:
            raise GGUFImportError(f"{source}: metadata gpt2.{key} is missing")
        return meta[f"gpt2.{key}"]

    n_embd = int(get("embedding_length"))
    if int(get("feed_forward_length")) != 4 * n_embd:
        raise GGUFImportError(f"{source}: gpt2.feed_forward_length must be 4 x embedding_length")
    try:
        return GPTConfig(
            name=name,
            vocab_size=len(meta.get("tokenizer.ggml.tokens") or []),
            context_length=int(get("context_length")),
            n_layer=int(get("block_count")),
            n_head=int(get("attention.head_count")),
            n_embd=n_embd,
            layer_norm_eps=float(get("attention.layer_norm_epsilon")),
        )
    except ValueError as exc:
        raise GGUFImportError(f"{source}: {exc}") from None


def config_from_gguf(meta: dict[str, Any], *, name: str = "custom", source: str = "GGUF") -> DecoderConfig:
    """The :class:`DecoderConfig` a GGUF file's ``{arch}.*`` hyper-parameters describe."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFImportError(
            f"{source}: architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)}; gpt2: load_gguf)"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFImportError(f"{source}: metadata {arch}.{key} is missing")
        return value

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_size = int(
        meta.get(f"{arch}.attention.key_length")
        or meta.get(f"{arch}.rope.dimension_count")
        or n_embd // n_head
    )
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    common = dict(
        family=ARCHITECTURES[arch],
        name=name,
        vocab_size=int(vocab),
        context_length=int(get("context_length")),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        n_embd=n_embd,
        head_size=head_size,
        intermediate_size=int(get("feed_forward_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
    )
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    scaling = None
    if scaling_type == "linear":
        scaling = {"factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise GGUFImportError(f"{source}: RoPE scaling {scaling_type!r} is not supported")
    try:
        if arch == "gemma3":
            every = (
                6  # Gemma 3: five sliding-window layers, then a global one (transformers' default as well)
            )
            return DecoderConfig(
                **common,
                activation="gelu_tanh",
                norm_offset=1.0,
                rope_theta=float(meta.get("gemma3.rope.freq_base", 1e6)),
                rope_scaling=scaling,
                rope_local_theta=10000.0,
                qk_norm=True,
                sandwich_norm=True,
                embed_scale=True,
                query_pre_attn_scalar=float(head_size),  # llama.cpp's choice for every size but 27B
                sliding_window=int(get("attention.sliding_window")),
                layer_types=tuple(
                    "full" if (i + 1) % every == 0 else "sliding" for i in range(common["n_layer"])
                ),
            )
        return DecoderConfig(
            **common,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            qk_norm=arch == "qwen3",
        )
    except ValueError as exc:
        raise GGUFImportError(f"{source}: {exc}") from None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rows (its RoPE pairs x[i] with x[i + 1]; HF's with
    x[i + hs/2])."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, dtype: torch.dtype, *, source: str, rows: int = 4096) -> torch.Tensor:
    """One tensor as ``dtype``, dequantized by the ``gguf`` package ``rows`` rows at a time into the result, so
    the package's float32 temporaries stay small next to the largest tensor (the token embedding)."""
    from gguf.quants import dequantize

    data = tensor.data  # memory-mapped: quantized blocks are (rows, bytes per row), float types (rows, cols)
    try:
        first = dequantize(data[:1], tensor.tensor_type)
    except NotImplementedError as exc:
        raise GGUFImportError(f"{source}: {exc}") from None
    out = torch.empty((data.shape[0], *first.shape[1:]), dtype=dtype)
    for start in range(0, data.shape[0], rows):
        chunk = dequantize(data[start : start + rows], tensor.tensor_type)
        out[start : start + len(chunk)] = torch.from_numpy(np.array(chunk, dtype=np.float32))  # a small copy
    return out


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face (for ``gpt2``: gptlab's GPT-2) parameter name of a llama.cpp tensor; None if none."""
    if arch == "gpt2":
        if gguf_name in GPT2_TENSORS:
            return GPT2_TENSORS[gguf_name]
        parts = gguf_name.split(".")
        if (
            len(parts) == 4
            and parts[0] == "blk"
            and parts[2] in GPT2_BLOCK
            and parts[3] in ("weight", "bias")
        ):
            return f"transformer.h.{parts[1]}.{GPT2_BLOCK[parts[2]]}.{parts[3]}"
        return None
    if gguf_name in DECODER_TENSORS:
        return DECODER_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
        layer, kind = parts[1], parts[2]
        if kind == "ffn_norm":  # the norm before the MLP: Llama's second norm, Gemma's pre-feedforward one
            norm = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
            return f"model.layers.{layer}.{norm}.weight"
        if kind in DECODER_BLOCK:
            return f"model.layers.{layer}.{DECODER_BLOCK[kind]}.weight"
    return None


def _gpt2_tokenizer(meta: dict[str, Any], source: str) -> GPT2Tokenizer | HFTokenizer:
    """tiktoken's GPT-2 tokenizer for a file with GPT-2's vocabulary, else the one the metadata describes."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if (
        meta.get("tokenizer.ggml.pre") == "gpt-2"
        and len(tokens) == VOCAB_SIZE
        and tokens[EOT_ID] == ENDOFTEXT
    ):
        return GPT2Tokenizer()
    return HFTokenizer.from_gguf_metadata(meta, source=source)


def load_gguf(
    path: str | Path, *, name: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Decoder | GPT, HFTokenizer | GPT2Tokenizer]:
    """The model and tokenizer stored in a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: not found")
    try:
        reader = _reader(path)
    except (ValueError, OSError) as exc:
        raise GGUFImportError(f"{path}: not a GGUF file ({' '.join(str(exc).split())[:160]})") from None
    meta = read_metadata(reader)
    # The parsed key/value fields (one small array per token and merge string) are no longer needed: freeing
    # them before the weights are built keeps them out of the peak.
    reader.fields.clear()
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES and arch != "gpt2":
        raise GGUFImportError(
            f"{path}: architecture {arch!r} is not supported ({', '.join([*ARCHITECTURES, 'gpt2'])})"
        )
    names = {t.name for t in reader.tensors}
    if arch == "gpt2":
        config = gpt2_config_from_gguf(meta, name=name or path.stem, source=str(path))
        config = dataclasses.replace(config, tie_weights="output.weight" not in names)
        tokenizer = _gpt2_tokenizer(meta, str(path))
        del meta
        with torch.device("meta"):
            model = GPT(config)
        tensors = (
            (hf_name(t.name, arch) or t.name, _dequantize(t, dtype, source=f"{path}: {t.name}"))
            for t in reader.tensors
        )
        assign_state(model, tensors, source=str(path))
        return model.eval(), tokenizer
    config = config_from_gguf(meta, name=name or path.stem, source=str(path))
    if "rope_freqs.weight" in names:
        raise GGUFImportError(
            f"{path}: per-frequency RoPE factors (rope_freqs, Llama 3.1+) are not supported from GGUF; import the "
            "model's Hugging Face directory instead"
        )
    if "output.weight" not in names:
        config = config.replace(tie_weights=True)
    elif config.tie_weights:
        config = config.replace(tie_weights=False)
    tokenizer = HFTokenizer.from_gguf_metadata(meta, source=str(path))
    del meta
    with torch.device("meta"):
        model = Decoder(config)

    def tensors():
        for t in reader.tensors:
            key = hf_name(t.name, arch)
            if key is None:
                raise GGUFImportError(f"{path}: tensor {t.name!r} has no counterpart in a {arch} model")
            w = _dequantize(t, dtype, source=f"{path}: tensor {t.name!r}")  # torch's (out, in) order
            if arch == "llama" and ".attn_q." in t.name:
                w = torch.from_numpy(_unpermute(w.numpy(), config.n_head))
            elif arch == "llama" and ".attn_k." in t.name:
                w = torch.from_numpy(_unpermute(w.numpy(), config.n_kv_head))
            if arch == "gemma3" and t.name.endswith("norm.weight"):
                w -= 1.0  # llama.cpp stores Gemma's (1 + w) scale
            yield key, w

    assign_state(model, tensors(), source=str(path))
    return model.eval(), tokenizer
