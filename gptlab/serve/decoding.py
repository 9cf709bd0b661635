"""Decoding for ``gptlab serve``: one request's generation, token by token, with Ollama's stop-string and
streaming rules.

Streaming decodes token by token but only emits text that decodes cleanly (the bytes of an incomplete UTF-8
sequence wait for the next token) and never emits text that might be the start of a stop string, so the
chunks always concatenate to exactly the non-streaming text. Detokenization is incremental, as in vLLM and
TGI (prefix-offset decoding): each token decodes only a short trailing window of ids, not everything so far.
Each request seeds its own ``torch.Generator`` (a random seed when none is given), so the same seed and
options reproduce the same text.

Concurrency: when the model has a :class:`gptlab.serve.batching.Batcher` (``gptlab serve --max-batch N``, N > 1,
the default), its worker thread decodes all running requests of the model together (continuous batching).
Otherwise (``--max-batch 1``) every request has its own KV cache (made inside :func:`gptlab.generate.stream`)
and forward passes are serialized with a per-model lock, one decoding step at a time, in worker threads. Either
way the event loop never waits on a forward pass.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import anyio
import torch

from gptlab.generate import SamplingConfig, stream
from gptlab.serve.models import ServedModel


class ServerStopping(RuntimeError):
    """The server is shutting down: a generation ends at its next step."""


class ClientGone(RuntimeError):
    """The client disconnected: decoding for it stops."""


@dataclass(frozen=True)
class DecodeOptions:
    sampling: SamplingConfig
    seed: int | None
    num_predict: int
    """Maximum new tokens; -1 (or Ollama's -2): until the context window is full."""
    stop: tuple[str, ...] | None
    """None: the endpoint's default stop strings for the model."""


class TextFilter:
    """Token ids in, text pieces out: incremental decoding, stop strings, an optional prefix to drop.

    ``push`` returns ``(piece, stopped)``. A piece never contains the start of an incomplete UTF-8 sequence
    (decoded text that ends in U+FFFD waits for the next token) nor a tail that could still become a stop
    string; once a stop string appears, everything from it on is dropped. ``finish`` flushes what was held
    back at the end. The pieces concatenate to ``decode(ids)`` (cut at the first stop string) for tokenizers
    whose decoding is prefix-stable at character boundaries (byte-level BPE: GPT-2's, Llama 3's, SmolLM2's):
    each step decodes only the ids since the last emitted character boundary, plus the previous window as
    context.

    ``header`` (the Alpaca ``### Response:``) is dropped when the text starts with it, before stop strings
    are looked for; ``strip_leading`` drops leading whitespace from the output, after they are looked for,
    so a plain chat model that starts with ``"\nuser:"`` stops there instead of answering ``"user: ..."``.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stops: Sequence[str] = (),
        *,
        strip_leading: bool = False,
        header: str | None = None,
    ) -> None:
        self._decode = decode
        self._ids: list[int] = []
        # Prefix-offset detokenization: ids[_prefix:_read] were already passed on (as text) and give the
        # decoder its context; ids[_read:] are not yet passed on. Both offsets sit at UTF-8 character
        # boundaries (text is passed on only when it does not end in an incomplete sequence).
        self._prefix = 0
        self._read = 0
        self._stops = tuple(s for s in stops if s)
        self._strip_leading = strip_leading
        self._header = header
        # Text seen before it is known whether it starts with the header.
        self._pending: str | None = "" if header else None
        self._text = ""
        self._emitted = 0
        self._started = not strip_leading  # whether non-whitespace output has been emitted

    def push(self, token: int) -> tuple[str, bool]:
        self._ids.append(token)
        return self._feed(self._new_text(final=False), final=False)

    def finish(self) -> tuple[str, bool]:
        return self._feed(self._new_text(final=True), final=True)

    def _new_text(self, *, final: bool) -> str:
        """Text of the ids not yet passed on: decode a window from the prefix offset and keep what follows
        the decoded prefix. O(window) per token instead of O(all ids so far)."""
        prefix = self._decode(self._ids[self._prefix : self._read]) if self._read > self._prefix else ""
        text = self._decode(self._ids[self._prefix :])
        # An incomplete UTF-8 sequence decodes to U+FFFD for now: wait for the token that completes it.
        if not final and (len(text) <= len(prefix) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix) :]

    def _feed(self, new: str, *, final: bool) -> tuple[str, bool]:
        if self._pending is not None:
            self._pending += new
            start = self._after_header(self._pending, final)
            if start is None:
                return "", False
            self._pending, new = None, start
        self._text += new
        text, begin = self._text, self._emitted
        # A stop string cannot begin before `begin`: any text that could start one was held back.
        hits = [i for i in (text.find(s, begin) for s in self._stops) if i >= 0]
        if hits:
            self._emitted = min(hits)
            return self._strip(text[begin : self._emitted]), True
        self._emitted = len(text) if final else len(text) - self._stop_prefix_len(text, begin)
        return self._strip(text[begin : self._emitted]), False

    def _after_header(self, buf: str, final: bool) -> str | None:
        """``buf`` without a leading header, or None while it could still turn out to be one."""
        assert self._header is not None
        t = buf.lstrip()
        if t.startswith(self._header):
            return t[len(self._header) :]
        if self._header.startswith(t) and not final:
            return None
        return buf

    def _strip(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        return piece

    def _stop_prefix_len(self, text: str, begin: int) -> int:
        """Length of the longest tail of ``text[begin:]`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text) - begin), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


class Generation:
    """One request's decoding. Iterate for the text pieces; the counters are final once it is exhausted."""

    def __init__(
        self,
        served: ServedModel,
        prompt_ids: Sequence[int],
        options: DecodeOptions,
        stops: Sequence[str],
        *,
        strip_leading: bool = False,
        header: str | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        ctx = served.model.config.context_length
        self.served = served
        self.stopping = stopping
        # stream() keeps the last `ctx` tokens of a longer prompt; count what the model really sees.
        tokenizer = served.tokenizer
        # Unconditional text starts after a BOS (GPT-2: after <|endoftext|>).
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        self.prompt_ids = list(prompt_ids)[-ctx:] or [start]
        self.options = options
        if options.num_predict < 0:
            self.max_new_tokens = max(ctx - len(self.prompt_ids), 0)
        else:
            self.max_new_tokens = options.num_predict
        self.filter = TextFilter(tokenizer.decode, stops, strip_leading=strip_leading, header=header)
        self.output_ids: list[int] = []
        self.eval_count = 0
        self.done_reason = "length"
        self.prompt_eval_ns = 0
        self.eval_ns = 0

    @property
    def prompt_eval_count(self) -> int:
        return len(self.prompt_ids)

    def new_generator(self) -> torch.Generator | None:
        """This request's RNG: seeded from ``seed`` (or at random); None for greedy decoding."""
        opts = self.options
        if opts.sampling.temperature == 0:
            return None
        seed = opts.seed if opts.seed is not None else secrets.randbits(63)
        return torch.Generator(device=self.served.device).manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)

    def accept(self, token: int) -> tuple[str, bool]:
        """Take one sampled token: the text piece it releases, and whether the generation is over."""
        self.eval_count += 1
        if token in self.served.stop_ids:
            self.done_reason = "stop"
            return self.finish_text(), True
        self.output_ids.append(token)
        piece, stopped = self.filter.push(token)
        if stopped:
            self.done_reason = "stop"
            return piece, True
        if self.eval_count >= self.max_new_tokens:
            return piece + self.finish_text(), True
        return piece, False

    def finish_text(self) -> str:
        """Flush the text held back (a possible stop-string start, an incomplete character)."""
        piece, stopped = self.filter.finish()
        if stopped:
            self.done_reason = "stop"
        return piece

    def __iter__(self) -> Iterator[str]:
        """The serialized path (no batcher): decode alone, taking the model's lock for every step."""
        served = self.served
        steps = stream(
            served.model,
            [self.prompt_ids],
            max_new_tokens=self.max_new_tokens,
            sampling=self.options.sampling,
            eos_id=served.stop_ids,
            generator=self.new_generator(),
        )
        try:
            while True:
                if self.stopping is not None and self.stopping.is_set():
                    raise ServerStopping("the server is shutting down")
                t0 = time.perf_counter_ns()
                with served.lock:  # one forward pass at a time per model; released before any socket write
                    nxt = next(steps, None)
                elapsed = time.perf_counter_ns() - t0
                if self.eval_count == 0:
                    self.prompt_eval_ns += elapsed  # the first step encodes the whole prompt
                else:
                    self.eval_ns += elapsed
                if nxt is None:  # max_new_tokens == 0
                    piece, done = self.finish_text(), True
                else:
                    piece, done = self.accept(int(nxt[0]))
                if piece:
                    yield piece
                if done:
                    return
        finally:
            steps.close()


_DONE = object()
_POLL_S = 0.25  # how often a request waiting on the batcher checks its connection


async def pieces(gen: Generation, disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """``gen``'s text pieces, decoded off the event loop (by the model's batcher, or step by step in worker
    threads); raises :class:`ClientGone` as soon as ``disconnected()`` says the client left, and stops
    decoding (the KV cache or batch slot is freed) however it ends."""
    batcher = gen.served.batcher
    if batcher is not None:
        ticket = batcher.submit(gen)
        try:
            while True:
                if await disconnected():
                    raise ClientGone("client disconnected")
                # Shielded like a worker-thread step (at most _POLL_S): when Starlette cancels the response
                # because the client left, the next check still sees it and ends with ClientGone.
                with anyio.CancelScope(shield=True):
                    piece = await ticket.get(timeout=_POLL_S)
                if piece is None:  # nothing yet: look at the connection again
                    continue
                if piece is ticket.END:
                    return
                yield piece
        finally:
            ticket.cancel()  # a request still decoding leaves the batch before the next step
    steps = iter(gen)
    try:
        while True:
            if await disconnected():
                raise ClientGone("client disconnected")
            piece = await anyio.to_thread.run_sync(next, steps, _DONE)
            if piece is _DONE:
                return
            yield piece
    finally:
        steps.close()  # type: ignore[attr-defined]
