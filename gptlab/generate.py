"""Autoregressive decoding: greedy, temperature, top-k, top-p, EOS stop, batched prompts, KV cache.

Extends the book's ``generate_text_simple`` (ch. 4) and ``generate`` (ch. 5, temperature + top-k) with nucleus
sampling (Holtzman et al., "The Curious Case of Neural Text Degeneration", 2020), left-padded batches and an
incremental key/value cache. With the cache each step feeds one token per sequence; without it the whole
window is re-encoded, which is what the cache must reproduce.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gptlab.errors import UserError
from gptlab.model import GPT, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen."""

    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int | None = None
    """Keep only the k most likely tokens (None or 0: no limit)."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability mass reaches p (None or 1.0: no limit)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row from ``logits`` (B, V); returns (B,) int64."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass *before* it already reaches p; the top token always survives.
        drop = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _stop_ids(eos_id: int | Sequence[int] | None) -> list[int]:
    if eos_id is None:
        return []
    return [int(eos_id)] if isinstance(eos_id, int) else [int(i) for i in eos_id]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None):
    """Left-pad token lists into (B, L) ids and a (B, L) attention mask (1 = real token)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[i, L - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def stream(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_logits=None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, step by step: (B,) int64 per step.

    ``eos_id``: the token that ends a sequence, or several (a chat model's EOS and end-of-turn tokens).
    Sequences that produced one keep emitting the first until all are done (callers strip them).
    When a sequence would outgrow the context window the oldest tokens slide out, as in the book's
    ``generate`` (``idx[:, -context_size:]``); the cache is then rebuilt from the window so both paths agree.
    ``on_logits(step, logits)`` (optional) receives each step's (B, V) next-token logits.
    """
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    device = next(model.parameters()).device
    ctx = model.config.context_length
    stops = _stop_ids(eos_id)
    pad_id = stops[0] if stops else 0
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    ids, mask = left_pad(prompts, pad_id, device)  # (B, L)
    if ids.size(1) > ctx:
        ids, mask = ids[:, -ctx:], mask[:, -ctx:]
    finished = torch.zeros(ids.size(0), dtype=torch.bool, device=device)
    padded = bool((mask == 0).any())
    cache: KVCache | None = None
    new_ids = ids
    for step in range(max_new_tokens):
        if use_cache and cache is not None and cache.length < cache.max_length:
            logits = model(new_ids, attention_mask=mask if padded else None, cache=cache, last_only=True)
        else:
            if use_cache:
                dtype = next(model.parameters()).dtype
                # Room for what is left to feed, no more: a cache at the full context (8192 positions for
                # SmolLM2) costs more to allocate than a short answer takes to decode.
                need = ids.size(1) + max_new_tokens - step - 1
                cache = model.new_cache(ids.size(0), device=device, dtype=dtype, max_length=min(ctx, need))
            logits = model(ids, attention_mask=mask if padded else None, cache=cache, last_only=True)
        next_logits = logits[:, -1, :]  # (B, V)
        if on_logits is not None:
            on_logits(step, next_logits)
        nxt = sample_next(next_logits, sampling, generator)  # (B,)
        if stops:
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            finished |= torch.isin(nxt, stop_tensor)
        yield nxt
        if stops and bool(finished.all()):
            return
        new_ids = nxt.unsqueeze(1)  # (B, 1)
        ids = torch.cat([ids, new_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(new_ids)], dim=1)
        if ids.size(1) > ctx:
            ids, mask = ids[:, -ctx:], mask[:, -ctx:]
            cache = None  # the window slid: positions changed, so the cache must be rebuilt
            padded = bool((mask == 0).any())


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generate continuations for a batch of prompts; returns the new tokens of each, EOS excluded."""
    stops = set(_stop_ids(eos_id))
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for nxt in stream(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_id=eos_id,
        use_cache=use_cache,
        generator=generator,
    ):
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok in stops:
                done[i] = True
            else:
                outputs[i].append(tok)
    return outputs
