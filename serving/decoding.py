"""Decoding for ``gptlab serve``: one request's generation, token by token, with Ollama's stop-string and
streaming rules.

Streaming decodes token by token but only emits text that decodes cleanly (the bytes of an incomplete UTF-8
sequence wait for the next token) and never emits text that might be the start of a stop string, so the
chunks always concatenate to exactly the non-streaming text. Each request seeds its own ``torch.Generator``
(a random seed when none is given), so the same seed and options reproduce the same text.

Concurrency: every request has its own KV cache (made inside :func:`gptlab.generate.stream`) and its own RNG;
the model is read-only in eval mode. Forward passes of one model are serialized with a per-model lock, one
decoding step at a time, in worker threads: concurrent requests interleave token by token instead of
over-subscribing the CPU's threads with parallel matmuls, and the event loop never waits on a forward pass.
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
from serving.models import ServedModel


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
    back at the end. The pieces concatenate to ``decode(ids)`` (cut at the first stop string), for any
    tokenizer: each step decodes all ids so far and emits what is new.

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
        self._decoded = 0  # characters of decode(ids) already passed on
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
        text = self._decode(self._ids)
        stable = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD for now
        new, self._decoded = text[self._decoded : stable], max(self._decoded, stable)
        return self._feed(new, final=False)

    def finish(self) -> tuple[str, bool]:
        text = self._decode(self._ids)
        new, self._decoded = text[self._decoded :], len(text)
        return self._feed(new, final=True)

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

    def __iter__(self) -> Iterator[str]:
        served, opts = self.served, self.options
        generator = None
        if opts.sampling.temperature > 0:
            seed = opts.seed if opts.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=served.device).manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        steps = stream(
            served.model,
            [self.prompt_ids],
            max_new_tokens=self.max_new_tokens,
            sampling=opts.sampling,
            eos_id=served.stop_ids,
            generator=generator,
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
                if nxt is None:
                    break
                token = int(nxt[0])
                self.eval_count += 1
                if token in served.stop_ids:
                    self.done_reason = "stop"
                    break
                self.output_ids.append(token)
                piece, stopped = self.filter.push(token)
                if piece:
                    yield piece
                if stopped:
                    self.done_reason = "stop"
                    return
            piece, stopped = self.filter.finish()
            if stopped:
                self.done_reason = "stop"
            if piece:
                yield piece
        finally:
            steps.close()


_DONE = object()


async def pieces(gen: Generation, disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """``gen``'s text pieces, each decoding step run in a worker thread; raises :class:`ClientGone` as soon as
    ``disconnected()`` says the client left, and stops decoding (the KV cache is freed) however it ends."""
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
