"""Row and slot surgery on a :class:`gptlab.model.KVCache` for continuous batching (:mod:`gptlab.serve.batching`).

Sequences join a running batch right-aligned (left-padded, like :func:`gptlab.generate.left_pad`), leave it, and
leading slots that are padding in every row are dropped. Positions come from the attention mask, so none of this
changes them. Only the server batches this way, so the core's cache keeps just what generation needs.
"""

from __future__ import annotations

import torch

from gptlab.model import KVCache


def resize(cache: KVCache, max_length: int) -> None:
    """Change the capacity (keeps the filled positions); ``max_length`` must hold ``cache.length``."""
    if max_length < cache.length:
        raise ValueError(f"KVCache resize: capacity {max_length} < filled length {cache.length}")
    for name in ("k", "v"):
        old = getattr(cache, name)
        new = old.new_zeros((*old.shape[:3], max_length, old.size(4)))  # (L, B, nkv, max_length, hs)
        new[:, :, :, : cache.length] = old[:, :, :, : cache.length]
        setattr(cache, name, new)
    cache.max_length = max_length


def keep_rows(cache: KVCache, rows: list[int]) -> None:
    """Keep only the sequences ``rows`` (in that order)."""
    if list(rows) == list(range(cache.batch_size)):
        return  # every row, in order: nothing to copy
    index = torch.as_tensor(rows, dtype=torch.long, device=cache.k.device)
    cache.k, cache.v = cache.k.index_select(1, index), cache.v.index_select(1, index)


def drop_front(cache: KVCache, n: int) -> None:
    """Forget the first ``n`` filled positions of every row (callers drop only slots that are padding)."""
    if not 0 <= n <= cache.length:
        raise ValueError(f"KVCache drop_front: {n} not in [0, {cache.length}]")
    if n:
        rest = slice(n, cache.length)
        cache.k[:, :, :, : cache.length - n] = cache.k[:, :, :, rest].clone()
        cache.v[:, :, :, : cache.length - n] = cache.v[:, :, :, rest].clone()
        cache.length -= n


def concat(caches: list[KVCache], max_length: int | None = None) -> tuple[KVCache, list[int]]:
    """The rows of ``caches`` in one cache, right-aligned at the longest ``length``; also the number of padding
    slots put in front of each input's rows (zeros; the caller masks them)."""
    if not caches:
        raise ValueError("concat needs at least one cache")
    length = max(c.length for c in caches)
    first = caches[0]
    n_layer, _, n_kv_head, _, head_size = first.k.shape
    out = KVCache(
        n_layer,
        sum(c.batch_size for c in caches),
        n_kv_head,
        head_size,
        max(max_length or 0, length),
        device=first.k.device,
        dtype=first.k.dtype,
    )
    out.length = length
    pads, row = [], 0
    for c in caches:
        pad, rows = length - c.length, slice(row, row + c.batch_size)
        out.k[:, rows, :, pad:length] = c.k[:, :, :, : c.length]
        out.v[:, rows, :, pad:length] = c.v[:, :, :, : c.length]
        pads.append(pad)
        row += c.batch_size
    return out, pads
