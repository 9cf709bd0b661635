"""The book's own ``GPTModel`` weights (ch. 4-7) to and from gptlab's GPT.

A model trained with the book's code is saved as ``torch.save(model.state_dict(), "model.pth")`` (ch. 5; or a
dict with ``"model_state_dict"`` next to the optimizer's). Its layout differs from GPT-2's in three ways, all
mapped here: separate ``W_query``/``W_key``/``W_value`` (gptlab fuses them into ``c_attn``, rows q, k, v),
``scale``/``shift`` for LayerNorm weight/bias, and an ``out_head`` of its own (never tied). The causal-mask
buffer ``att.mask`` is derived, not learned: it is dropped on import and rebuilt on export. A classifier (ch. 6)
has an ``out_head`` with a bias and ``num_classes`` rows.

The state dict does not record the number of attention heads (it does not change any shape), so it is passed
in. Pure tensor mapping, no file I/O: the CLI's ``import-book`` reads the file (``weights_only=True``).
"""

from __future__ import annotations

import re

import torch

from gptlab.config import GPTConfig
from gptlab.errors import UserError
from gptlab.model import GPT

_BLOCK = re.compile(r"^trf_blocks\.(\d+)\.")
# Book name (within a block) -> gptlab name (within transformer.h.<i>), for everything but W_query/W_key/W_value.
_BLOCK_NAMES = {
    "att.out_proj.weight": "attn.c_proj.weight",
    "att.out_proj.bias": "attn.c_proj.bias",
    "ff.layers.0.weight": "mlp.c_fc.weight",
    "ff.layers.0.bias": "mlp.c_fc.bias",
    "ff.layers.2.weight": "mlp.c_proj.weight",
    "ff.layers.2.bias": "mlp.c_proj.bias",
    "norm1.scale": "ln_1.weight",
    "norm1.shift": "ln_1.bias",
    "norm2.scale": "ln_2.weight",
    "norm2.shift": "ln_2.bias",
}
_TOP_NAMES = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "final_norm.scale": "transformer.ln_f.weight",
    "final_norm.shift": "transformer.ln_f.bias",
    "out_head.weight": "lm_head.weight",
    "out_head.bias": "lm_head.bias",
}
_QKV = ("W_query", "W_key", "W_value")


def book_state_dict(obj: object, *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The model's tensors from what the book saves: a state dict, or ``{"model_state_dict": ...}``."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or "tok_emb.weight" not in obj:
        raise UserError(f"{source}: not a state dict of the book's GPTModel (no 'tok_emb.weight')")
    return obj


def config_from_book(
    state: dict[str, torch.Tensor], *, n_head: int, dropout: float = 0.0, name: str = "book-gpt"
) -> GPTConfig:
    """The :class:`GPTConfig` of a book ``GPTModel`` state dict (the head count is not in the weights)."""
    vocab, n_embd = state["tok_emb.weight"].shape
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    head = state.get("out_head.weight")
    if head is None:
        raise UserError("book state dict has no 'out_head.weight'")
    classes = head.shape[0] if "out_head.bias" in state else None
    return GPTConfig(
        name=name,
        vocab_size=vocab,
        context_length=state["pos_emb.weight"].shape[0],
        n_layer=len(blocks),
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
        qkv_bias="trf_blocks.0.att.W_query.bias" in state,
        tie_weights=False,
        num_classes=classes,
    )


def from_book_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The book's tensors under gptlab's names (``W_query``/``W_key``/``W_value`` concatenated into ``c_attn``)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = tensor
            continue
        m = _BLOCK.match(key)
        if m is None:
            raise UserError(f"book state dict: unexpected key {key!r}")
        i, rest = int(m.group(1)), key[m.end() :]
        if rest == "att.mask":
            continue  # the causal mask buffer: derived from context_length, not a weight
        part, _, kind = rest.removeprefix("att.").partition(".")
        if part in _QKV:
            qkv.setdefault((i, kind), {})[part] = tensor
        elif rest in _BLOCK_NAMES:
            out[f"transformer.h.{i}.{_BLOCK_NAMES[rest]}"] = tensor
        else:
            raise UserError(f"book state dict: unexpected key {key!r}")
    for (i, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise UserError(f"book state dict: block {i} has {sorted(parts)} {kind}s, expected all of {_QKV}")
        out[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat([parts[p] for p in _QKV])
    return out


def to_book_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """A state dict the book's ``GPTModel(cfg).load_state_dict`` accepts (strict), mask buffers included."""
    cfg = model.config
    if cfg.tied or cfg.embedding_rows != cfg.vocab_size or not cfg.bias:
        raise UserError("the book's GPTModel has an untied head, no padded vocabulary and biases everywhere")
    top = {v: k for k, v in _TOP_NAMES.items()}
    block = {v: k for k, v in _BLOCK_NAMES.items()}
    mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key in top:
            out[top[key]] = tensor
            continue
        i, rest = key.removeprefix("transformer.h.").split(".", 1)
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[-1]
            for part, chunk in zip(_QKV, tensor.chunk(3), strict=True):
                out[f"trf_blocks.{i}.att.{part}.{kind}"] = chunk
        else:
            out[f"trf_blocks.{i}.{block[rest]}"] = tensor
    for i in range(cfg.n_layer):
        out[f"trf_blocks.{i}.att.mask"] = mask
    return out


def load_book_model(state: object, *, n_head: int, dropout: float = 0.0) -> GPT:
    """A gptlab :class:`GPT` holding the weights of a book ``GPTModel`` state dict."""
    state = book_state_dict(state)
    config = config_from_book(state, n_head=n_head, dropout=dropout)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(from_book_state_dict(state), assign=True)
    return model
