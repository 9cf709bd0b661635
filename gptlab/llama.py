"""Modern open-weight decoders from scratch: Llama 3.2 / SmolLM2, Qwen3 and Gemma 3 in one configurable model.

The book's bonus material builds Llama 3.2 (``llama3.py``), Qwen3 (``qwen3.py``) and Gemma 3 on top of the ch. 4
GPT; they share one skeleton, which :class:`Decoder` implements once, with Hugging Face's parameter names
(``model.layers.0.self_attn.q_proj`` …) so checkpoints map one to one:

* RMSNorm instead of LayerNorm (Zhang & Sennrich, 2019); Gemma scales by ``1 + w`` (``norm_offset``);
* rotary position embeddings (RoPE, Su et al., 2021) instead of a learned position table, with Llama 3's
  frequency scaling (``rope_scaling``) and, for Gemma 3, a separate base for sliding-window layers;
* gated MLPs: SwiGLU (Shazeer, 2020) for Llama/Qwen, GeGLU with tanh-GELU for Gemma;
* grouped-query attention (Ainslie et al., 2023): ``n_kv_head`` key/value heads shared by ``n_head`` queries;
* Qwen3 and Gemma 3 normalise queries and keys per head (``qk_norm``);
* Gemma 3 also scales the embeddings by sqrt(n_embd), normalises each sub-layer's output as well as its input
  (``sandwich_norm``), scales queries by ``query_pre_attn_scalar ** -0.5``, and alternates sliding-window
  (local) layers with global ones (``layer_types``).

Same interface as :class:`gptlab.model.GPT` (``forward(idx, attention_mask=, cache=)``, ``num_classes`` heads,
:class:`gptlab.model.KVCache`), so generation, training, LoRA and the stages work unchanged. Numerics match
``transformers`` (``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma3ForCausalLM``) to float32 rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import DecoderConfig
from gptlab.errors import UserError
from gptlab.model import KVCache, init_normal, set_dropout


class RMSNorm(nn.Module):
    """``x / rms(x) * (offset + weight)``, computed in float32 (as the reference implementations do)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        # Gemma stores weight - 1 (offset 1): zeros are its identity, ones everybody else's.
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def rope_frequencies(head_size: int, theta: float, scaling: dict[str, float] | None = None) -> torch.Tensor:
    """Inverse frequencies (head_size / 2,) of RoPE, with Llama 3's (or linear) scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    if "original_context_length" not in scaling:  # linear: every frequency slowed down alike
        return inv_freq / factor
    # Llama 3.1+: long wavelengths (low frequencies) slowed by ``factor``, short ones kept, smooth in between.
    old = scaling["original_context_length"]
    low_wavelen = old / scaling["low_freq_factor"]
    high_wavelen = old / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by position: the two halves of each head are the (x, y) of hs/2 planes."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        C, hs = config.n_embd, config.head_size
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, hs
        self.q_proj = nn.Linear(C, config.n_head * hs, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, config.n_kv_head * hs, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, config.n_kv_head * hs, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.n_head * hs, C, bias=config.attention_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(hs, config.rms_norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(hs, config.rms_norm_eps, config.norm_offset)
        self.qk_norm = config.qk_norm
        self.scale = (config.query_pre_attn_scalar or hs) ** -0.5
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope  # (B or 1, 1, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs), S = cached + T
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if mask is None:  # a fresh sequence, full causal attention: SDPA's fused kernels
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.scale, enable_gqa=gqa
            )
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale, enable_gqa=gqa
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, nh*hs)
        return self.o_proj(y)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU with SiLU, GeGLU with tanh-GELU."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.gelu = config.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        eps, offset = config.rms_norm_eps, config.norm_offset
        self.input_layernorm = RMSNorm(config.n_embd, eps, offset)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, eps, offset)
        if config.sandwich_norm:
            # Gemma: post_attention_layernorm normalises the attention output; the MLP gets its own pair.
            self.pre_feedforward_layernorm = RMSNorm(config.n_embd, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.n_embd, eps, offset)
        self.mlp = GatedMLP(config)
        self.sandwich = config.sandwich_norm
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache, layer) -> torch.Tensor:
        if self.sandwich:
            x = x + self.drop(
                self.post_attention_layernorm(
                    self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
                )
            )
            return x + self.drop(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))
        x = x + self.drop(self.self_attn(self.input_layernorm(x), rope, mask, cache, layer))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """A Llama-family language model (or sequence classifier when ``config.num_classes`` is set).

    Initial weights: N(0, 0.02) for linear layers and embeddings, norms at their identity (as Hugging Face's
    ``gptlab.model.init_normal``); real use starts from imported weights.
    """

    LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layer))
        self.model.norm = RMSNorm(config.n_embd, config.rms_norm_eps, config.norm_offset)
        out_features = config.num_classes or config.vocab_size
        self.lm_head = nn.Linear(config.n_embd, out_features, bias=config.num_classes is not None)
        self.apply(init_normal)
        if config.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", self._inv_freq(local=False), persistent=False)
        self.register_buffer("inv_freq_local", self._inv_freq(local=True), persistent=False)

    def _inv_freq(self, *, local: bool, device: torch.device | None = None) -> torch.Tensor:
        cfg = self.config
        if local:
            return rope_frequencies(cfg.head_size, cfg.rope_local_theta or cfg.rope_theta).to(device)
        return rope_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling).to(device)

    def finish_loading(self) -> None:
        """After weights were assigned into a model built on the meta device: tie the head to the embedding
        again and compute the RoPE frequencies (buffers that no checkpoint stores)."""
        if self.config.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        device = self.model.embed_tokens.weight.device
        self.inv_freq = self._inv_freq(local=False, device=device)
        self.inv_freq_local = self._inv_freq(local=True, device=device)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def set_dropout(self, p: float) -> Decoder:
        """Change every dropout rate in place (DPO's policy and reference log-probs must both be exact)."""
        set_dropout(self, p)
        self.config = self.config.replace(dropout=p)
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, shared tensors counted once; ``non_embedding`` drops the token embedding when it
        is not also the head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tied:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, 6N + 12·L·H·Q·T (Chinchilla/PaLM appendix B)."""
        cfg = self.config
        T = seq_len or cfg.context_length
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    def new_cache(
        self,
        batch_size: int,
        *,
        device=None,
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ) -> KVCache:
        """An empty key/value cache for ``batch_size`` sequences of up to ``max_length`` tokens
        (default and at most ``context_length``)."""
        cfg = self.config
        length = min(max_length or cfg.context_length, cfg.context_length)
        return KVCache(
            cfg.n_layer, batch_size, cfg.n_kv_head, cfg.head_size, length, device=device, dtype=dtype
        )

    def _rope(self, inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype):
        freqs = pos[..., None].float() * inv_freq  # (B or 1, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B or 1, 1, T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) — or (B, T, num_classes) — for token ids ``idx`` (B, T); (B, 1, ·) for the
        last position alone with ``last_only``.

        ``attention_mask`` (B, S) marks real (1) vs padding (0) positions over everything seen so far (cached +
        new), as produced by left-padding a batch; positions count real tokens only, as in :class:`GPT`.
        """
        cfg = self.config
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > cfg.context_length:
            raise UserError(
                f"sequence of {past + T} tokens exceeds the model's context_length {cfg.context_length}"
            )
        keep = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise UserError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}"
                )
            keep = attention_mask.bool()
            pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        else:
            pos = torch.arange(past, past + T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.n_embd**0.5, dtype=x.dtype)
        ropes = {"full": self._rope(self.inv_freq, pos, x.dtype)}
        masks: dict[str, torch.Tensor | None] = {}
        for kind in {cfg.layer_type(i) for i in range(cfg.n_layer)}:
            window = cfg.sliding_window if kind == "sliding" else None
            fresh = keep is None and past == 0 and (window is None or window >= T)
            masks[kind] = None if fresh else _attention_mask(keep, T, past, window, idx.device)
            if kind == "sliding":
                ropes["sliding"] = self._rope(self.inv_freq_local, pos, x.dtype)
        for i, layer in enumerate(self.model.layers):
            kind = cfg.layer_type(i)
            x = layer(x, ropes[kind], masks[kind], cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(self.model.norm(x))


def _attention_mask(
    keep: torch.Tensor | None, T: int, past: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean SDPA mask (B or 1, 1, T, S): causal, within ``window`` positions if given, minus padded keys."""
    S = past + T
    q_pos = torch.arange(past, S, device=device).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (q_pos - k_pos < window)
    mask = mask[None, None]  # (1, 1, T, S)
    if keep is not None:
        mask = mask & keep[:, None, None, :]  # (B, 1, T, S)
        # A padding query may see no key at all; let it see every key so SDPA yields no NaN (never used).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask
