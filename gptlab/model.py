"""GPT-2 model: pre-LayerNorm decoder blocks, GELU MLP, causal multi-head attention.

Implements the architecture of the book's ch. 4 (``GPTModel``) with OpenAI GPT-2's parameter names
(``transformer.h.0.attn.c_attn`` …) as in nanoGPT's ``model.py``, so imported GPT-2 weights map one to one.
Attention runs through ``torch.nn.functional.scaled_dot_product_attention``. A preallocated key/value cache
(:class:`KVCache`) makes incremental decoding O(T) per token. Reference: Radford et al., "Language Models are
Unsupervised Multitask Learners" (2019); Vaswani et al., "Attention Is All You Need" (2017).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import GPTConfig
from gptlab.errors import UserError


class KVCache:
    """Preallocated keys/values for every layer, (B, n_kv_head, max_length, head_size) each; ``length`` is how
    many positions are filled. Models make theirs with ``model.new_cache(batch_size)``."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_size: int,
        max_length: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_length = max_length
        shape = (n_layer, batch_size, n_kv_head, max_length, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's ``k, v`` (B, nh, T, hs) for ``layer``; return all keys/values so far."""
        start, stop = self.length, self.length + k.size(2)
        if stop > self.max_length:
            raise ValueError(f"KVCache is full: {stop} positions requested, capacity {self.max_length}")
        self.k[layer, :, :, start:stop] = k.to(self.k.dtype)
        self.v[layer, :, :, start:stop] = v.to(self.v.dtype)
        return self.k[layer, :, :, :stop], self.v[layer, :, :, :stop]

    @property
    def batch_size(self) -> int:
        return self.k.size(1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            # Pure causal attention over a fresh sequence: lets SDPA pick its fused (flash) kernel.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 used the tanh approximation of GELU; so does the book's GELU module.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


INIT_SCHEMES = ("gpt2", "torch_default")
"""How :class:`GPT` draws its initial weights (see its docstring)."""


def init_normal(module: nn.Module) -> None:
    """GPT-2's initialisation of one layer: linear and embedding weights N(0, 0.02), biases 0 (``model.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every ``nn.Dropout`` and every attention's SDPA dropout rate (a float ``dropout`` attribute) to ``p``."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif type(getattr(module, "dropout", None)) in (int, float):
            module.dropout = p


class GPT(nn.Module):
    """GPT-2 language model (or sequence classifier when ``config.num_classes`` is set).

    ``init`` picks the initial weights, drawn from the global torch RNG:

    * ``gpt2``: N(0, 0.02) for linear layers and embeddings, residual projections scaled by
      1/sqrt(2·n_layer) (Radford et al. 2019; nanoGPT);
    * ``torch_default``: PyTorch's own defaults (``nn.Embedding`` N(0, 1), ``nn.Linear`` Kaiming-uniform
      weights and uniform biases, bound 1/sqrt(fan_in)), drawn in the order the book's ch. 4 ``GPTModel``
      creates its layers (``W_query``, ``W_key``, ``W_value`` as three matrices). After the same
      ``torch.manual_seed`` the weights equal the book's bit for bit, and the RNG is left where the book
      leaves it, so dropout masks and shuffles that follow draw the same numbers too.
    """

    def __init__(self, config: GPTConfig, *, init: str = "gpt2") -> None:
        if init not in INIT_SCHEMES:
            raise UserError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}")
        super().__init__()
        self.config = config
        device = torch.empty(0).device  # the default device, before the meta context below hides it
        # torch_default draws every tensor itself, in the book's order: building the layers must draw nothing.
        with torch.device("meta") if init == "torch_default" else nullcontext():
            self.transformer = nn.ModuleDict(
                dict(
                    wte=nn.Embedding(config.embedding_rows, config.n_embd),
                    wpe=nn.Embedding(config.context_length, config.n_embd),
                    drop=nn.Dropout(config.dropout),
                    h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                    ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
                )
            )
            out_features = config.num_classes or config.embedding_rows
            self.lm_head = nn.Linear(config.n_embd, out_features, bias=config.num_classes is not None)
        if init == "gpt2":
            self.apply(init_normal)
            for name, p in self.named_parameters():
                # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance
                # does not grow with depth.
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        else:
            self.to_empty(device=device)
            self._init_torch_default()
        if config.tied:
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def _init_torch_default(self) -> None:
        cfg, C = self.config, self.config.n_embd
        wte = self.transformer.wte.weight
        nn.init.normal_(wte[: cfg.vocab_size])  # the book's tok_emb has no padding rows
        nn.init.zeros_(wte[cfg.vocab_size :])
        nn.init.normal_(self.transformer.wpe.weight)
        for block in self.transformer.h:
            qkv = block.attn.c_attn
            for part in range(3):  # the book's W_query, W_key, W_value, each a Linear of its own
                rows = slice(part * C, (part + 1) * C)
                _linear_default(qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])
            for linear in (block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                _linear_default(linear.weight, linear.bias)
        for norm in self.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.reset_parameters()
        if not cfg.tied:
            _linear_default(self.lm_head.weight, self.lm_head.bias)

    def set_dropout(self, p: float) -> GPT:
        """Change every dropout rate in place (DPO compares policy and reference log-probs: both must be exact)."""
        set_dropout(self, p)
        self.config = self.config.replace(dropout=p)
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, shared tensors counted once; ``non_embedding`` drops the position embedding
        (and the token embedding when it is not also the head), as in the scaling-law convention."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
            if not self.config.tied:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, 6N + 12·L·H·Q·T (Chinchilla/PaLM appendix B, as in nanoGPT)."""
        cfg = self.config
        T = seq_len or cfg.context_length
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    def finish_loading(self) -> None:
        """After weights were assigned into a model built on the meta device: tie the head again."""
        if self.config.tied:
            self.lm_head.weight = self.transformer.wte.weight

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    @property
    def final_norm(self) -> nn.Module:
        return self.transformer.ln_f

    def new_cache(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ) -> KVCache:
        """An empty key/value cache for ``batch_size`` sequences of up to ``max_length`` tokens
        (default and at most ``context_length``)."""
        cfg = self.config
        length = min(max_length or cfg.context_length, cfg.context_length)
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, cfg.head_size, length, device=device, dtype=dtype)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for token ids ``idx`` (B, T).

        ``attention_mask`` (B, S) marks real (1) vs padding (0) positions over everything the model sees so far
        (cached + new; S = cache.length + T), as produced by left-padding a batch. Returns (B, T, vocab_size)
        logits, or (B, T, num_classes) for a classifier (callers use the last position, book ch. 6);
        ``last_only``: (B, 1, ·) for the last position alone, all that generation reads (the head is a
        prompt's largest matmul).
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.context_length:
            raise UserError(
                f"sequence of {past + T} tokens exceeds the model's context_length {self.config.context_length}"
            )
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise UserError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}"
                )
            keep = attention_mask.bool()
            # Positions count real tokens only, so a left-padded prompt sees the same positions as unpadded.
            pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            mask = self._attention_mask(keep, T, past)
        else:
            pos = torch.arange(past, past + T, device=idx.device).unsqueeze(0)  # (1, T)
            mask = None if past == 0 else self._attention_mask(None, T, past, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        if self.config.num_classes is None and self.config.embedding_rows != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # padding rows are never valid tokens
        return logits

    @staticmethod
    def _attention_mask(
        keep: torch.Tensor | None, T: int, past: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """Boolean SDPA mask (B or 1, 1, T, S): causal over absolute positions, minus padded keys."""
        device = keep.device if keep is not None else device
        S = past + T
        q_pos = torch.arange(past, S, device=device).unsqueeze(1)  # (T, 1)
        k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
        mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if keep is not None:
            mask = mask & keep[:, None, None, :]  # (B, 1, T, S)
            # A padding query may see no key at all; let it see every key so SDPA yields no NaN.
            # Its output is never used.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        return mask


def _linear_default(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``nn.Linear.reset_parameters`` on a (view of a) weight: the same draws, in the same order."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.size(1))
        nn.init.uniform_(bias, -bound, bound)
