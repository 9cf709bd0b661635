"""Batches for training: resumable epochs over token windows (book ch. 2's data loader) and over in-memory lists.

:class:`EpochBatches` is the shared engine (epochs, shuffling, exact resume); :class:`WindowLoader` serves the
(input, target) windows of ``create_dataloader_v1`` from a :class:`gptlab.data.TokenStream`; :class:`ListBatches`
collates in-memory examples (classification, SFT and DPO records).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import torch

from gptlab.data import TokenStream, positive_int
from gptlab.errors import UserError

T = TypeVar("T")


class Splits(NamedTuple, Generic[T]):
    """A dataset's train/validation/test parts, in this order whatever order a recipe cuts them in."""

    train: list[T]
    val: list[T]
    test: list[T]


ORDERS = ("seeded", "torch")
"""Where a shuffled epoch's order comes from (see :class:`EpochBatches`)."""


def _torch_draw() -> int:
    # The draw DataLoader makes for an iterator's base seed and RandomSampler for its generator.
    return int(torch.empty((), dtype=torch.int64).random_().item())


class EpochBatches:
    """Resumable epoch-by-epoch batches over ``num_items`` indexable items, shared by the batch sources.

    Iterating yields the batches from the current position to the end of the current epoch, then moves to
    the next epoch, so ``for batch in source`` run repeatedly walks epoch after epoch. ``fetch(indices)``
    builds one batch. Only one live iterator: a new ``iter()`` or :meth:`load_state_dict` invalidates older
    ones. Without ``shuffle`` every epoch is in list order; with it, ``order`` decides:

    * ``seeded``: epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(num_items)``, independent of
      the global RNG, so a run resumes from :meth:`state_dict` alone;
    * ``torch``: ``torch.utils.data.DataLoader(shuffle=...)`` as the book's ``create_dataloader_v1`` uses it
      (ch. 2): every pass that starts at the beginning of an epoch draws from the global torch RNG — one draw
      for the iterator's base seed, and with ``shuffle`` one for ``RandomSampler``'s generator, which then
      gives ``torch.randperm`` — so with the same seed the batches (and the RNG stream left for dropout)
      are the book's. The pass's draw is kept in :meth:`state_dict`, so a resumed run re-creates its order.
    """

    def __init__(
        self,
        num_items: int,
        *,
        batch_size: int,
        fetch: Callable[[np.ndarray], Any],
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        order: str = "seeded",
        name: str = "batch source",
    ) -> None:
        if order not in ORDERS:
            raise UserError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.num_items = num_items
        self.batch_size = positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            # default_rng rejects negative seed entropy; fail here rather than at the first batch.
            raise UserError(f"seed must be a non-negative int, got {seed!r}")
        self.fetch = fetch
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.order_mode = order
        self.name = name
        self.epoch = 0
        self.position = 0
        self.pass_seed: int | None = None  # ``torch`` order: the current pass's RandomSampler seed
        self._iter_token = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return math.ceil(self.num_items / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Item indices in the order epoch ``epoch`` visits them (``torch`` order: the current pass's)."""
        if not self.shuffle:
            return np.arange(self.num_items)
        if self.order_mode == "torch":
            generator = torch.Generator().manual_seed(self.pass_seed)
            return torch.randperm(self.num_items, generator=generator).numpy()
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def __iter__(self) -> Iterator[Any]:
        self._iter_token += 1
        return self._batches(self._iter_token)

    def _batches(self, token: int) -> Iterator[Any]:
        epoch, n, B = self.epoch, len(self), self.batch_size
        if self.order_mode == "torch" and (self.position == 0 or self.pass_seed is None):
            _torch_draw()  # the DataLoader iterator's base seed: drawn, unused with num_workers=0
            self.pass_seed = _torch_draw() if self.shuffle else 0
        order = self.order(epoch)
        for b in range(self.position, n):
            if token != self._iter_token:
                raise RuntimeError(f"{self.name} iterator invalidated by a newer iter() or load_state_dict()")
            batch = self.fetch(order[b * B : (b + 1) * B])  # the last batch may be short
            # Advance before yielding: a state_dict taken while the caller holds batch b already counts
            # it, and after the epoch's last batch it points at the next epoch, not an empty tail.
            if b + 1 == n:
                self.epoch, self.position = epoch + 1, 0
            else:
                self.position = b + 1
            yield batch

    def state_dict(self) -> dict:
        state = {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
        }
        if self.order_mode == "torch":
            state["pass_seed"] = self.pass_seed
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; the state's seed is adopted. ValueError if it came from other data/batching."""
        for key, mine in (("num_items", self.num_items), ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise UserError(f"{self.name} state has {key}={state[key]}, this one has {key}={mine}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise UserError(f"{self.name} state epoch={epoch}, position={position} is out of range")
        if position == len(self):
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
        self.seed = int(state.get("seed", self.seed))
        self.pass_seed = state.get("pass_seed")
        self._iter_token += 1


class ArrayStream:
    """Token ids held in memory, readable like a :class:`gptlab.data.TokenStream` (``len`` and ``read``)."""

    def __init__(self, ids, name: str = "ids") -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.ids[start:stop]

    def __repr__(self) -> str:
        return f"ArrayStream({self.name!r}, tokens={len(self.ids)})"


class WindowLoader(EpochBatches):
    """(input, target) windows of context_length with a stride, batched, deterministically shuffled by seed.

    Windows start at range(0, len(stream) - context_length, stride) exactly as the book's GPTDatasetV1,
    input = tokens[i : i+T], target = tokens[i+1 : i+T+1].

    Epochs, shuffling (``order``) and resuming as :class:`EpochBatches`; each batch is ``(x, y)``, both
    (B, T) int64.
    """

    def __init__(
        self,
        stream: TokenStream,
        *,
        context_length: int,
        batch_size: int,
        stride: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        order: str = "seeded",
    ) -> None:
        self.stream = stream
        self.context_length = T = positive_int("context_length", context_length)
        B = positive_int("batch_size", batch_size)
        self.stride = S = T if stride is None else positive_int("stride", stride)
        n = len(stream)
        self.num_windows = len(range(0, n - T, S))
        if self.num_windows == 0:
            raise UserError(
                f"one window of context_length={T} needs at least {T + 1} tokens (inputs + shifted "
                f"target), but {stream!r} has {n}"
            )
        if drop_last and self.num_windows < B:
            need = (B - 1) * S + T + 1
            raise UserError(
                f"one batch of batch_size={B} windows (context_length={T}, stride={S}) needs at least "
                f"{need} tokens, but {stream!r} has {n} ({self.num_windows} windows); lower batch_size "
                f"or pass drop_last=False"
            )
        super().__init__(
            self.num_windows,
            batch_size=B,
            fetch=self._gather,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            order=order,
            name="WindowLoader",
        )

    def _gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T, S = self.context_length, self.stride
        x = np.empty((len(windows), T), dtype=np.int64)  # (B, T)
        y = np.empty((len(windows), T), dtype=np.int64)  # (B, T)
        for row, w in enumerate(windows):
            start = int(w) * S
            chunk = self.stream.read(start, start + T + 1)  # (T + 1,)
            x[row] = chunk[:-1]
            y[row] = chunk[1:]
        return torch.from_numpy(x), torch.from_numpy(y)


class ListBatches(EpochBatches):
    """Resumable batches over an in-memory list, built by ``collate`` (classification, SFT and DPO data).

    Epochs, shuffling (``order``) and exact resume as :class:`EpochBatches`.
    """

    def __init__(
        self,
        items: Sequence,
        *,
        batch_size: int,
        collate: Callable[[list], Any],
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        order: str = "seeded",
    ) -> None:
        # A snapshot, so a caller mutating its list cannot shift a resumed run's order.
        self.items = list(items)
        self.collate = collate
        if not self.items:
            raise UserError("ListBatches needs at least one item")
        if drop_last and isinstance(batch_size, int) and len(self.items) < batch_size:
            raise UserError(
                f"drop_last with batch_size={batch_size} but only {len(self.items)} items: no batch would "
                f"ever be produced; lower batch_size or pass drop_last=False"
            )
        super().__init__(
            len(self.items),
            batch_size=batch_size,
            fetch=lambda indices: self.collate([self.items[int(i)] for i in indices]),
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            order=order,
            name="ListBatches",
        )
