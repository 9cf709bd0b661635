"""Continuous batching for ``gptlab serve``: the running requests of one model decode together.

Iteration-level scheduling as in Orca (Yu et al., "Orca: A Distributed Serving System for Transformer-Based
Generative Models", OSDI 2022) and vLLM/TGI: one worker thread per served model owns its forward passes.
Between two decoding steps requests join the batch and finished ones leave it (stop token, length, stop
string, client gone, server stopping), so a request never waits for another one to finish.

* A joining request's prompt is encoded by a forward pass of its own (exactly what it gets alone), then its
  KV cache is merged into the batch's right-aligned (:func:`gptlab.serve.cache_rows.concat`): every row is
  left-padded, the attention mask hides the padding slots exactly, and positions (learned or RoPE) count
  real tokens only, so each row sees the positions it has alone.
* One decoding step is one forward pass over all rows: (B, 1) new tokens, the (B, S) mask, the shared cache.
  Leading slots that are padding in every row are dropped when rows leave or the cache is full.
* Sampling is per request: its own temperature/top-k/top-p and its own seeded ``torch.Generator``, drawn
  from once per step as alone, so seeded sampling does not depend on the batch companions (up to float
  rounding of the logits, see below).
* A request whose sequence outgrows the context window leaves the batch and re-encodes its last
  ``context_length`` tokens each step, as :func:`gptlab.generate.stream` does alone.

Batched matmuls have other shapes than lone ones, so logits may differ in the last float bits from a lone
run; greedy tokens are the same unless two logits tie to within that rounding.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gptlab.generate import sample_next
from gptlab.model import KVCache
from gptlab.serve import cache_rows

if TYPE_CHECKING:
    from gptlab.serve.decoding import Generation
    from gptlab.serve.models import ServedModel

DEFAULT_MAX_BATCH = 16
_GROW = 256  # batch cache capacity grows in steps of this many slots (at most the context window)


class Ticket:
    """The event-loop side of one request: the worker puts text pieces, :attr:`END` or an exception here."""

    END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = False  # set by the event loop (client gone); the worker drops the request

    def put(self, item: object) -> None:
        """From the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    async def get(self, timeout: float) -> object | None:
        """The next piece (or :attr:`END`; raises the request's error); None when ``timeout`` passed first."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Slot:
    gen: Generation
    ticket: Ticket
    generator: torch.Generator | None
    tokens: list[int]
    """Prompt and sampled tokens; the last one is the next to feed."""
    cache: KVCache | None = field(default=None, repr=False)
    """The prompt's cache between prefill and joining the batch."""
    ended: bool = False
    """The request has been told it is over (END or an error): it is told nothing more."""

    @property
    def gone(self) -> bool:
        stopping = self.gen.stopping
        return self.ticket.cancelled or (stopping is not None and stopping.is_set())


class Batcher:
    """The decoding worker of one served model. :meth:`submit` a :class:`Generation`; :meth:`close` ends it."""

    def __init__(self, served: ServedModel, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.served = served
        self.model = served.model
        self.max_batch = max_batch
        self.ctx = served.model.config.context_length
        self._cond = threading.Condition()
        self._pending: deque[_Slot] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        # Worker state: the batch's rows, their shared cache and (B, S) attention mask; sliding rows.
        self._rows: list[_Slot] = []
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None
        self._sliding: list[_Slot] = []
        self.steps = 0
        """Batched decoding steps run so far (for tests and benchmarks)."""
        self.widest = 0
        """The most rows one decoding step has had."""

    # --- event-loop side ---------------------------------------------------------------------------------

    def submit(self, gen: Generation) -> Ticket:
        """Queue ``gen``; it joins the batch at the next step with a free row. Call from the event loop."""
        from gptlab.serve.decoding import ServerStopping

        ticket = Ticket(asyncio.get_running_loop())
        slot = _Slot(gen, ticket, gen.new_generator(), list(gen.prompt_ids))
        with self._cond:
            if self._closed:
                raise ServerStopping("the server is shutting down")
            self._pending.append(slot)
            if self._thread is None:
                name = f"gptlab-batch-{self.served.name}"
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return ticket

    def close(self, timeout: float = 30.0) -> None:
        """End every request (ServerStopping) and the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- worker side -------------------------------------------------------------------------------------

    def _run(self) -> None:
        from gptlab.serve.decoding import ServerStopping

        while True:
            with self._cond:
                while not (self._closed or self._pending or self._rows or self._sliding):
                    self._cond.wait()
                if self._closed:
                    stop = ServerStopping("the server is shutting down")
                    for slot in [*self._pending, *self._rows, *self._sliding]:
                        self._end(slot, stop)
                    self._pending.clear()
                    self._reset()
                    return
                free = self.max_batch - len(self._rows) - len(self._sliding)
                joiners = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
            try:
                with torch.no_grad():
                    self._iterate(joiners)
            except Exception as exc:  # a failed step: every request in it reports it; keep serving
                for slot in dict.fromkeys(
                    [*joiners, *self._rows, *self._sliding]
                ):  # a joiner may be a row now
                    if not slot.ended and not slot.ticket.cancelled:
                        self._end(slot, exc)
                self._reset()

    def _reset(self) -> None:
        self._rows, self._sliding, self._cache, self._mask = [], [], None, None

    def _end(self, slot: _Slot, error: BaseException | None = None) -> None:
        slot.ended = True
        slot.cache = None
        slot.ticket.put(error if error is not None else Ticket.END)

    def _iterate(self, joiners: list[_Slot]) -> None:
        from gptlab.serve.decoding import ServerStopping

        stop = ServerStopping("the server is shutting down")
        self._leave([i for i, s in enumerate(self._rows) if s.gone], stop)
        for slot in [s for s in self._sliding if s.gone]:
            self._sliding.remove(slot)
            self._end(slot, None if slot.ticket.cancelled else stop)
        merged = []
        for slot in joiners:
            if slot.gone:
                self._end(slot, None if slot.ticket.cancelled else stop)
            else:
                try:
                    if self._prefill(slot):
                        merged.append(slot)
                except Exception as exc:  # this prompt's own failure: the batch goes on without it
                    self._end(slot, exc)
        if merged:
            self._join(merged)
        if self._rows:
            self._step()
        for slot in list(self._sliding):
            self._slide(slot)

    def _emit(self, slot: _Slot, token: int) -> bool:
        """Hand ``token`` to the request; True when it is done (and has been told so)."""
        slot.tokens.append(token)
        piece, done = slot.gen.accept(token)
        if piece:
            slot.ticket.put(piece)
        if done:
            self._end(slot)
        return done

    def _sample(self, slot: _Slot, logits: torch.Tensor) -> int:
        return int(sample_next(logits, slot.gen.options.sampling, slot.generator)[0])

    def _prefill(self, slot: _Slot) -> bool:
        """Encode the prompt alone (as :func:`gptlab.generate.stream` does) and sample the first token; True
        when the request goes on decoding."""
        gen = slot.gen
        if gen.max_new_tokens == 0:
            piece = gen.finish_text()
            if piece:
                slot.ticket.put(piece)
            self._end(slot)
            return False
        t0 = time.perf_counter_ns()
        ids = torch.tensor([slot.tokens], dtype=torch.long, device=self.served.device)
        dtype = next(self.model.parameters()).dtype
        slot.cache = self.model.new_cache(1, device=ids.device, dtype=dtype, max_length=ids.size(1))
        with self.served.lock:
            logits = self.model(ids, cache=slot.cache, last_only=True)[:, -1, :]
        token = self._sample(slot, logits)
        gen.prompt_eval_ns += time.perf_counter_ns() - t0
        return not self._emit(slot, token)

    def _join(self, slots: list[_Slot]) -> None:
        caches = [s.cache for s in slots]
        assert all(c is not None for c in caches)
        if self._cache is not None:
            caches.insert(0, self._cache)
        capacity = self._cache.max_length if self._cache is not None else 0
        cache, pads = cache_rows.concat(caches, max_length=capacity)  # type: ignore[arg-type]
        device = cache.k.device
        masks = []
        if self._cache is not None:
            assert self._mask is not None
            masks.append(torch.cat([self._mask.new_zeros(self._mask.size(0), pads.pop(0)), self._mask], 1))
        for slot, pad in zip(slots, pads, strict=True):
            row = torch.zeros(1, cache.length, dtype=torch.long, device=device)
            row[:, pad:] = 1
            masks.append(row)
            slot.cache = None
        self._cache, self._mask = cache, torch.cat(masks, 0)
        self._rows.extend(slots)

    def _leave(self, rows: list[int], error: BaseException | None = None) -> None:
        """Drop batch rows ``rows`` (ending their requests: cancelled ones silently) and leading padding."""
        if not rows:
            return
        for i in rows:
            slot = self._rows[i]
            if error is not None:
                self._end(slot, None if slot.ticket.cancelled else error)
        self._remove(rows)

    def _remove(self, rows: list[int]) -> None:
        if not rows:
            return  # most steps: nobody left, and the cache must not be copied
        gone = set(rows)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        assert self._cache is not None and self._mask is not None
        cache_rows.keep_rows(self._cache, keep)
        self._mask = self._mask[keep]
        self._compact()

    def _compact(self) -> None:
        """Drop the leading cache slots that are padding in every row."""
        assert self._cache is not None and self._mask is not None
        n = int((self._mask.cumsum(1) == 0).sum(1).min())
        if n:
            cache_rows.drop_front(self._cache, n)
            self._mask = self._mask[:, n:]

    def _step(self) -> None:
        """One decoding step for every batch row."""
        # A row whose next token would not fit in the window slides instead, as it would alone.
        self._remove_to_sliding([i for i, s in enumerate(self._rows) if len(s.tokens) > self.ctx])
        if not self._rows:
            return
        cache, mask = self._cache, self._mask
        assert cache is not None and mask is not None
        if cache.length + 1 > cache.max_length:
            if cache.length + 1 > self.ctx:
                self._compact()  # every row fits, so some slots in front are padding in all of them
                mask = self._mask
                assert mask is not None
            if cache.length + 1 > cache.max_length:
                cache_rows.resize(cache, min(self.ctx, cache.max_length + _GROW))
        t0 = time.perf_counter_ns()
        new = torch.tensor([[s.tokens[-1]] for s in self._rows], dtype=torch.long, device=mask.device)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
        with self.served.lock:
            logits = self.model(new, attention_mask=mask, cache=cache)[:, -1, :]
        self._mask = mask
        tokens = [self._sample(slot, logits[i : i + 1]) for i, slot in enumerate(self._rows)]
        elapsed = time.perf_counter_ns() - t0
        self.steps += 1
        self.widest = max(self.widest, len(self._rows))
        done = []
        for i, (slot, token) in enumerate(zip(self._rows, tokens, strict=True)):
            slot.gen.eval_ns += elapsed  # the wall time of the steps it took part in
            if self._emit(slot, token):
                done.append(i)
        self._remove(done)

    def _remove_to_sliding(self, rows: list[int]) -> None:
        if rows:
            self._sliding.extend(self._rows[i] for i in rows)
            self._remove(rows)

    def _slide(self, slot: _Slot) -> None:
        """One step for a request past the context window: re-encode its last ``context_length`` tokens."""
        t0 = time.perf_counter_ns()
        ids = torch.tensor([slot.tokens[-self.ctx :]], dtype=torch.long, device=self.served.device)
        dtype = next(self.model.parameters()).dtype
        cache = self.model.new_cache(1, device=ids.device, dtype=dtype)
        with self.served.lock:
            logits = self.model(ids, cache=cache, last_only=True)[:, -1, :]
        token = self._sample(slot, logits)
        slot.gen.eval_ns += time.perf_counter_ns() - t0
        if self._emit(slot, token):
            self._sliding.remove(slot)
