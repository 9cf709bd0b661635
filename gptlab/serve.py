"""An Ollama-compatible HTTP server for gptlab checkpoints: ``gptlab serve --model NAME=CHECKPOINT_DIR``.

Any Ollama client (the ``ollama`` CLI, the ``ollama`` Python package, Open WebUI, LangChain, ...) can talk to
the models of this book through it. It implements the subset of the Ollama REST API that clients use, with
Ollama's JSON field names (https://github.com/ollama/ollama/blob/main/docs/api.md):

    GET  /                   "Ollama is running" (clients probe it, the Go CLI with HEAD)
    GET  /api/version        {"version": "gptlab-<version>"}
    GET  /api/tags           the served models (name, size, sha256 digest of the weights, details)
    GET  /api/ps             the same models, as "loaded" (they are loaded at start-up and stay loaded)
    POST /api/show           modelfile, parameters, template, details, model_info (architecture numbers)
    POST /api/generate       completion; NDJSON stream by default, one object with "stream": false
    POST /api/chat           chat; NDJSON stream by default, one object with "stream": false

and the OpenAI chat completions API (https://platform.openai.com/docs/api-reference/chat), as Ollama's
OpenAI compatibility layer does (https://github.com/ollama/ollama/blob/main/docs/openai.md):

    POST /v1/chat/completions   "chat.completion", or Server-Sent Events of "chat.completion.chunk"
    GET  /v1/models             the served models

Decoding options (Ollama's ``options``; the OpenAI names map onto them): ``temperature`` (0 = greedy),
``top_k`` (0 = off), ``top_p``, ``seed``, ``num_predict`` (-1 = until the context window is full) and ``stop``.
Defaults follow Ollama's (temperature 0.8, top_k 40, top_p 0.9) except ``num_predict``, 128 here (Ollama:
unlimited), so a model that never emits ``<|endoftext|>`` cannot keep a request busy forever; the OpenAI
endpoint uses OpenAI's defaults (temperature 1, top_p 1, no top-k) and the same 128-token limit. Generation
always stops at ``<|endoftext|>``. Each request seeds its own ``torch.Generator`` (a random seed when none is
given), so the same seed and options reproduce the same text.

Prompt rendering (what Ollama does with a model's TEMPLATE):

- plain language models: ``/api/generate`` uses the prompt as-is (``system``, if any, goes before it,
  separated by a blank line); ``/api/chat`` writes one ``role: content`` line per message and ends with
  ``assistant:``, and stops by default where the model starts a new ``\\nuser:``/``\\nassistant:``/``\\nsystem:``
  line.
- checkpoints whose ``meta.prompt_format`` is ``"alpaca"`` (the SFT and DPO stages): the book's Alpaca prompt
  (:func:`gptlab.instruct.format_input`) followed by ``### Response:``. For chat, the last user message is the
  instruction, system messages are prepended to it (blank-line separated, since the Alpaca preamble the model
  was tuned on must stay as it is), and earlier turns go to the ``### Input:`` section as ``User: ...`` /
  ``Assistant: ...`` lines. Like the book's ``.replace("### Response:", "").strip()``, leading whitespace and a
  repeated ``### Response:`` header are removed from the output, and the model stops by default at a new
  ``### Instruction:``/``### Input:``/``### Response:`` section. ``"raw": true`` bypasses the template.

A ``stop`` given in a request replaces these default stop strings (Ollama's rule for a Modelfile's ``stop``).
What a GPT-2 cannot honour is refused with a 400 rather than ignored: images, tools, thinking, ``suffix``
and structured outputs (``format``; so :mod:`stages.judge` needs ``use_schema: false`` against this server).
The model store endpoints (``/api/pull``, ``/api/create``, ``/api/delete``, ...) answer 501.

Streaming decodes token by token but only emits text that decodes cleanly (the bytes of an incomplete UTF-8
sequence wait for the next token) and never emits text that might be the start of a stop string, so the
chunks always concatenate to exactly the non-streaming text.

Concurrency: a ``ThreadingHTTPServer`` (one thread per connection). Every request has its own KV cache (made
inside :func:`gptlab.generate.stream`) and its own RNG; the model is read-only in eval mode. Forward passes
of one model are still serialized with a per-model lock, one decoding step at a time: concurrent requests
interleave token by token instead of over-subscribing the CPU's threads with parallel matmuls, and a slow
client reading a stream never holds the lock (it is released before each chunk is written).

The server binds 127.0.0.1 unless told otherwise: it has no authentication. It logs one line per request
(method, path, status, duration) to stderr.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import tiktoken
import torch

from gptlab import __version__
from gptlab.checkpoint import WEIGHTS, CheckpointError, load_checkpoint
from gptlab.fileio import sha256_file
from gptlab.generate import SamplingConfig, stream
from gptlab.instruct import format_input, format_response
from gptlab.model import GPT
from gptlab.tokenizer import EOT_ID, VOCAB_SIZE, encode, get_encoding

VERSION = f"gptlab-{__version__}"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434  # Ollama's, so clients find the server without configuration
DEFAULT_NUM_PREDICT = 128
OLLAMA_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # Ollama's documented defaults
OPENAI_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}  # OpenAI's (no top-k there)
ALPACA_HEADER = format_response("").strip()  # "### Response:"
ALPACA_STOPS = ("### Instruction:", "### Input:", "### Response:")
PLAIN_CHAT_STOPS = ("\nuser:", "\nassistant:", "\nsystem:")
MAX_BODY_BYTES = 16 * 2**20
PROMPT_FORMATS = (None, "alpaca")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_NDJSON = "application/x-ndjson"
_JSON = "application/json; charset=utf-8"
# Ollama endpoints that manage a model store; there is none here (the models are fixed at start-up).
_STORE_ENDPOINTS = (
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/embed",
    "/api/embeddings",
)
_log_lock = threading.Lock()


class HTTPError(Exception):
    """Ends a request with ``status`` and ``{"error": message}`` (in-band when a stream has begun)."""

    def __init__(self, status: int, message: str, *, allow: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = tuple(allow)  # for 405: the methods the path allows


# ----------------------------------------------------------------------------------------------- models


def parse_model_arg(spec: str) -> tuple[str, Path]:
    """``"NAME=CHECKPOINT_DIR"`` (the ``--model`` argument) -> ``(NAME, Path(CHECKPOINT_DIR))``."""
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"--model expects NAME=CHECKPOINT_DIR (e.g. sft=models/sft), got {spec!r}")
    if not _NAME_RE.match(name):
        raise ValueError(
            f"--model {spec!r}: invalid model name {name!r} (letters, digits, '.', '_', '-', '/', "
            "optionally ':tag')"
        )
    return name, Path(directory)


def canonical_name(name: str) -> str:
    """Ollama names carry a tag and clients append ``:latest`` when there is none: ``sft`` == ``sft:latest``."""
    return name if ":" in name else f"{name}:latest"


def _rfc3339(ts: float | None = None) -> str:
    # RFC 3339 with a "Z": what Go's time.Time (the ollama CLI) and pydantic (the Python client) both parse.
    return datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _human_count(n: int) -> str:
    """Ollama's ``parameter_size`` style: 7.3M, 124.4M, 1.6B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + unit
    return str(n)


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class ServedModel:
    """One checkpoint loaded for serving, with the facts ``/api/tags`` and ``/api/show`` report."""

    name: str
    """Canonical ``name:tag``."""
    path: Path
    model: GPT
    config: dict[str, Any]
    size: int
    """Bytes of ``model.safetensors``."""
    digest: str
    """sha256 of ``model.safetensors`` (hex), as Ollama reports a model's digest."""
    modified_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def meta(self) -> dict[str, Any]:
        return self.config.get("meta") or {}

    @property
    def prompt_format(self) -> str | None:
        return self.meta.get("prompt_format")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": "gpt2",
            "families": ["gpt2"],
            "parameter_size": _human_count(self.model.num_params()),
            "quantization_level": _DTYPE_NAMES.get(next(self.model.parameters()).dtype, "F32"),
        }

    def tag_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": _rfc3339(self.modified_at),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    def template(self) -> str:
        """The prompt rendering as an Ollama (Go) template, for display by ``/api/show``."""
        if self.prompt_format == "alpaca":
            instruction = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
            return format_input({"instruction": instruction, "input": ""}) + format_response("")
        return "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"

    def parameters(self) -> str:
        stops = ALPACA_STOPS if self.prompt_format == "alpaca" else ()
        lines = [f"{'stop':<15}{json.dumps(s)}" for s in ("<|endoftext|>", *stops)]
        lines += [f"{k:<15}{v}" for k, v in OLLAMA_SAMPLING.items()]
        lines.append(f"{'num_predict':<15}{DEFAULT_NUM_PREDICT}")
        lines.append(f"{'num_ctx':<15}{self.model.config.context_length}")
        return "\n".join(lines)

    def modelfile(self) -> str:
        params = "\n".join(f"PARAMETER {line}" for line in self.parameters().splitlines())
        return (
            f"# Modelfile generated by gptlab serve ({VERSION}); the weights are a gptlab checkpoint\n"
            f"FROM {self.path.resolve()}\n"
            f'TEMPLATE """{self.template()}"""\n'
            f"{params}\n"
        )

    def model_info(self) -> dict[str, Any]:
        cfg = self.model.config
        info: dict[str, Any] = {
            # GGUF key names, which the ollama CLI's `show` reads (<architecture>.context_length, ...).
            "general.architecture": "gpt2",
            "general.name": cfg.name,
            "general.parameter_count": self.model.num_params(),
            "gpt2.context_length": cfg.context_length,
            "gpt2.embedding_length": cfg.n_embd,
            "gpt2.feed_forward_length": 4 * cfg.n_embd,
            "gpt2.block_count": cfg.n_layer,
            "gpt2.attention.head_count": cfg.n_head,
            "gpt2.attention.layer_norm_epsilon": cfg.layer_norm_eps,
            "gpt2.vocab_size": cfg.vocab_size,
            "tokenizer.ggml.model": "gpt2",
            "gptlab.checkpoint": str(self.path.resolve()),
            "gptlab.prompt_format": self.prompt_format or "raw",
        }
        for key, value in self.meta.items():
            if isinstance(value, str | int | float | bool):
                info[f"gptlab.meta.{key}"] = value
        return info


def load_model(name: str, directory: str | Path, *, device: str | torch.device = "cpu") -> ServedModel:
    """Load one checkpoint for serving; a ValueError names the model and the directory on any problem."""
    directory = Path(directory)
    try:
        model, config = load_checkpoint(directory, device=device)
    except CheckpointError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None
    if model.config.num_classes is not None:
        raise ValueError(f"model {name!r}: {directory} is a classifier checkpoint; it cannot generate text")
    if config.get("tokenizer", "gpt2") != "gpt2" or model.config.vocab_size != VOCAB_SIZE:
        raise ValueError(
            f"model {name!r}: {directory} uses tokenizer {config.get('tokenizer')!r} with "
            f"{model.config.vocab_size} tokens; gptlab serve needs GPT-2's ({VOCAB_SIZE})"
        )
    prompt_format = (config.get("meta") or {}).get("prompt_format")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"model {name!r}: {directory} has unknown meta.prompt_format {prompt_format!r}")
    weights = directory / WEIGHTS
    stat = weights.stat()
    return ServedModel(
        name=canonical_name(name),
        path=directory,
        model=model,
        config=config,
        size=stat.st_size,
        digest=sha256_file(weights),
        modified_at=stat.st_mtime,
    )


# ---------------------------------------------------------------------------------------------- prompts


def render_generate_prompt(
    prompt: str, *, system: str | None = None, raw: bool = False, prompt_format: str | None = None
) -> str:
    """The text ``/api/generate`` feeds the model (module docstring: "Prompt rendering")."""
    if raw:  # Ollama: raw skips the template, system prompt included
        return prompt
    if prompt_format == "alpaca":
        instruction = f"{system}\n\n{prompt}" if system else prompt
        return format_input({"instruction": instruction, "input": ""}) + format_response("")
    return f"{system}\n\n{prompt}" if system else prompt


def render_chat_prompt(messages: Sequence[Mapping[str, str]], *, prompt_format: str | None = None) -> str:
    """The text ``/api/chat`` and ``/v1/chat/completions`` feed the model; ``messages`` are
    ``{"role", "content"}`` dicts and must end with a user message (after any system messages)."""
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the conversation must end with a message whose role is 'user'")
    if prompt_format == "alpaca":
        systems = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
        *history, last = turns
        instruction = "\n\n".join([*systems, last["content"]])
        context = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)
        return format_input({"instruction": instruction, "input": context}) + format_response("")
    return "\n".join([*(f"{m['role']}: {m['content']}" for m in messages), "assistant:"])


# --------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodeOptions:
    sampling: SamplingConfig
    seed: int | None
    num_predict: int
    """Maximum new tokens; -1 (or Ollama's -2): until the context window is full."""
    stop: tuple[str, ...] | None
    """None: the endpoint's default stop strings for the model."""


class TextFilter:
    """Token ids in, text pieces out: incremental UTF-8 decoding, stop strings, an optional prefix to drop.

    ``push`` returns ``(piece, stopped)``. A piece never contains the bytes of an incomplete UTF-8 sequence
    (the incremental decoder holds them back) nor a tail that could still become a stop string; once a stop
    string appears, everything from it on is dropped. ``finish`` flushes what was held back at the end.
    Decoding uses ``errors="replace"`` like ``tiktoken.Encoding.decode``, so the pieces concatenate to
    ``decode(ids)`` (cut at the first stop string).

    ``header`` (the Alpaca ``### Response:``) is dropped when the text starts with it, before stop strings
    are looked for; ``strip_leading`` drops leading whitespace from the output, after they are looked for,
    so a plain chat model that starts with ``"\nuser:"`` stops there instead of answering ``"user: ..."``.
    """

    def __init__(
        self,
        enc: tiktoken.Encoding,
        stops: Sequence[str] = (),
        *,
        strip_leading: bool = False,
        header: str | None = None,
    ) -> None:
        self._token_bytes = enc.decode_single_token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._strip_leading = strip_leading
        self._header = header
        # Text seen before it is known whether it starts with the header.
        self._pending: str | None = "" if header else None
        self._text = ""
        self._emitted = 0
        self._started = not strip_leading  # whether non-whitespace output has been emitted

    def push(self, token: int) -> tuple[str, bool]:
        return self._feed(self._utf8.decode(self._token_bytes(token)), final=False)

    def finish(self) -> tuple[str, bool]:
        return self._feed(self._utf8.decode(b"", final=True), final=True)

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
        self.prompt_ids = list(prompt_ids)[-ctx:] or [EOT_ID]  # GPT-2 starts unconditional text after EOT
        self.options = options
        if options.num_predict < 0:
            self.max_new_tokens = max(ctx - len(self.prompt_ids), 0)
        else:
            self.max_new_tokens = options.num_predict
        self.filter = TextFilter(get_encoding(), stops, strip_leading=strip_leading, header=header)
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
            eos_id=EOT_ID,
            generator=generator,
        )
        try:
            while True:
                if self.stopping is not None and self.stopping.is_set():
                    raise HTTPError(503, "the server is shutting down")
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
                if token == EOT_ID:
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


# ----------------------------------------------------------------------------------- request validation


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _string(body: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise HTTPError(400, f"field {key!r} is required")
        return None
    if not isinstance(value, str):
        raise HTTPError(400, f"field {key!r} must be a string, got {_type_name(value)}")
    if required and not value:
        raise HTTPError(400, f"field {key!r} must not be empty")
    return value


def _boolean(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HTTPError(400, f"field {key!r} must be a boolean, got {_type_name(value)}")
    return value


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HTTPError(400, f"field {key!r} must be a number, got {value!r}")
    return float(value)


def _integer(body: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    # JSON has one number type; 40.0 is a fine top_k.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"field {key!r} must be an integer, got {value!r}")
    return value


def _stops(value: object, key: str = "stop") -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise HTTPError(400, f"field {key!r} must be a string or a list of strings")
    return tuple(value)


def _decode_options(
    fields: Mapping[str, Any], defaults: Mapping[str, float], *, max_tokens_key: str = "num_predict"
) -> DecodeOptions:
    num_predict = _integer(fields, max_tokens_key, DEFAULT_NUM_PREDICT)
    assert num_predict is not None
    if num_predict < -2:
        raise HTTPError(
            400,
            f"field {max_tokens_key!r} must be >= -2 (-1: unlimited, -2: fill the context), got {num_predict}",
        )
    try:
        sampling = SamplingConfig(
            temperature=_number(fields, "temperature", defaults["temperature"]),
            top_k=_integer(fields, "top_k", int(defaults["top_k"])),
            top_p=_number(fields, "top_p", defaults["top_p"]),
        )
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    return DecodeOptions(
        sampling=sampling,
        seed=_integer(fields, "seed", None),
        num_predict=num_predict,
        stop=_stops(fields.get("stop")),
    )


def parse_ollama_options(options: object) -> DecodeOptions:
    """Ollama's ``options`` object (unknown keys, e.g. ``num_ctx`` or ``repeat_penalty``, are ignored)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise HTTPError(400, f"field 'options' must be an object, got {_type_name(options)}")
    return _decode_options(options, OLLAMA_SAMPLING)


def _content(value: object, where: str) -> str:
    """A message's content: a string, or (OpenAI) a list of ``{"type": "text", "text": ...}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise HTTPError(400, f"{where}: only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise HTTPError(400, f"{where}: 'content' must be a string, got {_type_name(value)}")


def _messages(value: object, *, required: bool) -> list[dict[str, str]]:
    if value is None:
        if required:
            raise HTTPError(400, "field 'messages' is required")
        return []
    if not isinstance(value, list):
        raise HTTPError(400, f"field 'messages' must be a list, got {_type_name(value)}")
    if required and not value:
        raise HTTPError(400, "field 'messages' must not be empty")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise HTTPError(400, f"{where} must be an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise HTTPError(400, f"{where}: 'role' must be system, user, assistant or tool, got {role!r}")
        if m.get("images"):
            raise HTTPError(400, f"{where}: this model does not support images")
        # OpenAI's "developer" messages are system messages for newer models.
        out.append(
            {"role": "system" if role == "developer" else role, "content": _content(m.get("content"), where)}
        )
    return out


def _reject_unsupported(body: Mapping[str, Any], name: str) -> None:
    """Features a GPT-2 cannot honour: an explicit 400 beats silently ignoring them (as Ollama does)."""
    if body.get("images"):
        raise HTTPError(400, f"model {name!r} does not support images")
    if body.get("tools"):
        raise HTTPError(400, f"model {name!r} does not support tools")
    if body.get("think"):
        raise HTTPError(400, f"model {name!r} does not support thinking")
    if body.get("suffix"):
        raise HTTPError(400, f"model {name!r} does not support insert (suffix)")
    if body.get("format"):
        raise HTTPError(400, f"model {name!r} does not support structured outputs (format)")


# ------------------------------------------------------------------------------------------------ server


class OllamaServer(ThreadingHTTPServer):
    """The HTTP server; ``models`` maps canonical ``name:tag`` to the loaded :class:`ServedModel`.

    :meth:`server_close` stops cleanly: running generations end at their next decoding step, idle
    keep-alive connections are woken up, and it waits for every connection thread. Without that, a thread
    still inside a forward pass when the interpreter exits can abort the process (PyTorch's C++ frames
    cannot unwind a daemon thread being torn down).
    """

    daemon_threads = True  # never keep the process alive by themselves; server_close() joins them

    def __init__(
        self, address: tuple[str, int], models: Mapping[str, ServedModel], *, log: IO[str] | None = None
    ) -> None:
        self.models = dict(models)
        self.log = log
        self.stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._busy: set[socket.socket] = set()  # connections in the middle of a request
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn's, but every connection's thread is recorded so server_close() can end it.
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self._connections_lock:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def server_close(self, timeout: float = 30.0) -> None:
        """Release the port and end every connection (call :meth:`shutdown` first if serving in a thread).

        A request being answered finishes (a generation stops at its next step and says so in-band); a
        connection waiting for its next keep-alive request is shut down, which wakes its thread. Sockets
        still busy after ``timeout`` seconds are shut down too.
        """
        self.stopping.set()
        super().server_close()
        deadline = time.monotonic() + timeout
        shut: set[socket.socket] = set()
        while True:
            with self._connections_lock:
                connections = dict(self._connections)
                busy = set(self._busy)
            if not connections:
                return
            late = time.monotonic() > deadline
            for sock in connections:
                if sock not in shut and (late or sock not in busy):
                    shut.add(sock)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            if late:
                for thread in connections.values():
                    thread.join(1.0)
                return
            time.sleep(0.01)

    def _set_busy(self, sock: socket.socket, busy: bool) -> None:
        with self._connections_lock:
            if busy:
                self._busy.add(sock)
            else:
                self._busy.discard(sock)

    def find(self, name: str) -> ServedModel:
        served = self.models.get(canonical_name(name))
        if served is None:
            raise HTTPError(404, f"model {name!r} not found")
        return served


def make_server(
    models: Mapping[str, str | Path],
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    device: str | torch.device = "cpu",
    log: IO[str] | None = None,
) -> OllamaServer:
    """Load every model (fail fast: one ValueError naming the bad directory) and bind ``host:port``.

    ``port=0`` picks a free port (see ``.server_address``). Call ``.serve_forever()`` to serve,
    ``.shutdown()`` from another thread to stop, ``.server_close()`` to release the socket. ``log``: where
    the per-request lines go (default: stderr).
    """
    if not models:
        raise ValueError("no models to serve: give at least one NAME=CHECKPOINT_DIR")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
    seen: set[str] = set()
    for name in models:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid model name {name!r}")
        if canonical_name(name) in seen:
            raise ValueError(f"model name {name!r} is given twice (as {canonical_name(name)!r})")
        seen.add(canonical_name(name))
    get_encoding()  # a missing tokenizer should fail now, not on the first request
    loaded = {canonical_name(n): load_model(n, d, device=device) for n, d in models.items()}
    return OllamaServer((host, port), loaded, log=log)


def serve(
    models: Mapping[str, str | Path],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str | torch.device = "cpu",
) -> None:
    """``gptlab serve``: load, print the URL, serve until Ctrl-C."""
    server = make_server(models, host, port, device=device)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    url = f"http://{shown}:{bound_port}"
    first = next(iter(server.models)).removesuffix(":latest")
    # stdout, flushed: a script that asked for --port 0 can read the URL from here.
    print(f"gptlab serve: listening on {url} (Ctrl-C stops)", flush=True)
    print(f"  models: {', '.join(server.models)}", flush=True)
    print(f'  try:    OLLAMA_HOST={shown}:{bound_port} ollama run {first} "Hello"', flush=True)
    if bound_host not in ("127.0.0.1", "::1", "localhost"):
        print(
            f"gptlab serve: warning: {bound_host} is reachable from other machines; there is no authentication",
            file=sys.stderr,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("gptlab serve: stopped", file=sys.stderr)
    finally:
        server.server_close()


_GET, _POST = ("GET",), ("POST",)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked transfer for streams
    server_version = f"gptlab/{__version__}"
    server: OllamaServer

    # One entry per path: allowed methods and the method name that handles it. HEAD works wherever GET does.
    routes: dict[str, tuple[tuple[str, ...], str]] = {
        "/": (_GET, "_root"),
        "/api/version": (_GET, "_version"),
        "/api/tags": (_GET, "_tags"),
        "/api/ps": (_GET, "_ps"),
        "/api/show": (_POST, "_show"),
        "/api/generate": (_POST, "_generate"),
        "/api/chat": (_POST, "_chat"),
        "/v1/models": (_GET, "_openai_models"),
        "/v1/chat/completions": (_POST, "_openai_chat"),
    }

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- plumbing

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs once per request, with the duration

    def log_message(self, format: str, *args: Any) -> None:
        self._log(format % args)

    def _log(self, text: str) -> None:
        out = self.server.log or sys.stderr
        with _log_lock:
            out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.client_address[0]} {text}\n")
            out.flush()

    def _dispatch(self) -> None:
        start = time.perf_counter()
        self._status = 0
        self._streaming = False
        self._openai = self.path.startswith("/v1/")
        note = ""
        self.server._set_busy(self.connection, True)
        try:
            self._body = self._read_body()
            path = urlsplit(self.path).path
            if path in _STORE_ENDPOINTS:
                raise HTTPError(
                    501,
                    f"gptlab serve does not implement {path}: it serves only the checkpoints given with "
                    f"--model ({', '.join(self.server.models)})",
                )
            if path not in self.routes:
                raise HTTPError(404, f"no such endpoint: {path}")
            methods, handler = self.routes[path]
            allowed = (*methods, "HEAD") if "GET" in methods else methods
            if self.command not in allowed:
                raise HTTPError(405, f"method {self.command} not allowed for {path}", allow=allowed)
            getattr(self, handler)()
        except HTTPError as exc:
            self._error(exc)
        except (BrokenPipeError, ConnectionResetError):
            note = " (client disconnected)"
            self.close_connection = True
        except Exception as exc:  # a bug or a model failure: report it, keep the server up
            traceback.print_exc(file=self.server.log or sys.stderr)
            self._error(HTTPError(500, f"{type(exc).__name__}: {exc}"))
        finally:
            self._log(f"{self.command} {self.path} {self._status} {time.perf_counter() - start:.3f}s{note}")
            if self.server.stopping.is_set():
                self.close_connection = True  # no further keep-alive requests
            self.server._set_busy(self.connection, False)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # the unread body would be taken for the next request
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise HTTPError(400, "invalid Content-Length")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self) -> dict[str, Any]:
        if not self._body:
            raise HTTPError(400, "missing request body: expected a JSON object")
        try:
            body = json.loads(self._body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"invalid JSON in request body: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"request body must be a JSON object, got {_type_name(body)}")
        return body

    def _send_bytes(
        self, status: int, data: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._send_bytes(status, json.dumps(obj, ensure_ascii=False).encode(), _JSON, headers)

    def _error(self, exc: HTTPError) -> None:
        if self._openai:
            kind = {404: "not_found_error", 500: "api_error"}.get(exc.status, "invalid_request_error")
            payload: dict[str, Any] = {
                "error": {"message": exc.message, "type": kind, "param": None, "code": None}
            }
        else:
            payload = {"error": exc.message}
        if self._streaming:
            # The status line is gone: report in-band, as Ollama does ({"error": ...} as the last line).
            try:
                if self._openai:
                    self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")
                else:
                    self._chunk(json.dumps(payload).encode() + b"\n")
                self._chunk(b"")
            except OSError:
                pass
            self.close_connection = True
            return
        headers = [("Allow", ", ".join(exc.allow))] if exc.allow else []
        try:
            self._send_json(payload, exc.status, headers)
        except OSError:
            self.close_connection = True

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self._streaming = True

    def _chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk; ``b""`` ends the body."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _ndjson(self, obj: Mapping[str, Any]) -> None:
        self._chunk(json.dumps(obj, ensure_ascii=False).encode() + b"\n")

    # -- Ollama endpoints

    def _root(self) -> None:
        self._send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8")

    def _version(self) -> None:
        self._send_json({"version": VERSION})

    def _tags(self) -> None:
        self._send_json({"models": [m.tag_entry() for m in self.server.models.values()]})

    def _ps(self) -> None:
        models = []
        for m in self.server.models.values():
            entry = m.tag_entry()
            del entry["modified_at"]
            gpu = m.device.type != "cpu"
            # Loaded at start-up and never unloaded: expires "never", rendered as a far-away date.
            entry.update(expires_at="2999-12-31T23:59:59Z", size_vram=m.size if gpu else 0)
            entry["context_length"] = m.model.config.context_length
            models.append(entry)
        self._send_json({"models": models})

    def _show(self) -> None:
        body = self._json_body()
        # Older clients send "name" instead of "model"; Ollama accepts both.
        name = _string(body, "model") or _string(body, "name", required=True)
        assert name is not None
        m = self.server.find(name)
        self._send_json(
            {
                "modelfile": m.modelfile(),
                "parameters": m.parameters(),
                "template": m.template(),
                "details": m.details(),
                "model_info": m.model_info(),
                "capabilities": ["completion"],
                "modified_at": _rfc3339(m.modified_at),
            }
        )

    def _load_response(self, name: str, body: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
        # An empty prompt / message list is how clients (the ollama CLI) preload or unload a model.
        reason = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
        self._send_json(
            {"model": name, "created_at": _rfc3339(), **extra, "done": True, "done_reason": reason}
        )

    def _stats(self, gen: Generation, t_start: int, t_decode: int) -> dict[str, Any]:
        return {
            "done_reason": gen.done_reason,
            "total_duration": time.perf_counter_ns() - t_start,
            "load_duration": t_decode - t_start,  # request parsing + tokenizing: the models are preloaded
            "prompt_eval_count": gen.prompt_eval_count,
            "prompt_eval_duration": gen.prompt_eval_ns,
            "eval_count": gen.eval_count,
            "eval_duration": gen.eval_ns,
        }

    def _generate(self) -> None:
        t_start = time.perf_counter_ns()
        body = self._json_body()
        name = _string(body, "model", required=True)
        assert name is not None
        m = self.server.find(name)
        prompt = _string(body, "prompt") or ""
        system = _string(body, "system")
        raw = _boolean(body, "raw", False)
        streaming = _boolean(body, "stream", True)
        context = body.get("context") or []
        vocab = m.model.config.vocab_size
        if not isinstance(context, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in context
        ):
            raise HTTPError(400, f"field 'context' must be a list of token ids in [0, {vocab})")
        _reject_unsupported(body, name)
        options = parse_ollama_options(body.get("options"))
        if not prompt and not system and not context:
            self._load_response(name, body, {"response": ""})
            return
        alpaca = m.prompt_format == "alpaca" and not raw
        text = render_generate_prompt(prompt, system=system, raw=raw, prompt_format=m.prompt_format)
        prompt_ids = [*context, *encode(text)]
        default_stops = ALPACA_STOPS if alpaca else ()
        gen = Generation(
            m,
            prompt_ids,
            options,
            options.stop if options.stop is not None else default_stops,
            strip_leading=alpaca,
            header=ALPACA_HEADER if alpaca else None,
            stopping=self.server.stopping,
        )
        t_decode = time.perf_counter_ns()

        def final(response: str) -> dict[str, Any]:
            return {
                "model": name,
                "created_at": _rfc3339(),
                "response": response,
                "done": True,
                **self._stats(gen, t_start, t_decode),
                "context": [*gen.prompt_ids, *gen.output_ids],
            }

        self._run(gen, streaming, lambda piece: {"response": piece}, name, final)

    def _chat(self) -> None:
        t_start = time.perf_counter_ns()
        body = self._json_body()
        name = _string(body, "model", required=True)
        assert name is not None
        m = self.server.find(name)
        messages = _messages(body.get("messages"), required=False)
        streaming = _boolean(body, "stream", True)
        _reject_unsupported(body, name)
        options = parse_ollama_options(body.get("options"))
        if not messages:
            self._load_response(name, body, {"message": {"role": "assistant", "content": ""}})
            return
        gen = self._chat_generation(m, messages, options)
        t_decode = time.perf_counter_ns()

        def final(content: str) -> dict[str, Any]:
            return {
                "model": name,
                "created_at": _rfc3339(),
                "message": {"role": "assistant", "content": content},
                "done": True,
                **self._stats(gen, t_start, t_decode),
            }

        self._run(
            gen, streaming, lambda piece: {"message": {"role": "assistant", "content": piece}}, name, final
        )

    def _chat_generation(
        self, m: ServedModel, messages: list[dict[str, str]], options: DecodeOptions
    ) -> Generation:
        try:
            text = render_chat_prompt(messages, prompt_format=m.prompt_format)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        alpaca = m.prompt_format == "alpaca"
        default_stops = ALPACA_STOPS if alpaca else PLAIN_CHAT_STOPS
        return Generation(
            m,
            encode(text),
            options,
            options.stop if options.stop is not None else default_stops,
            strip_leading=True,  # "assistant:" / "### Response:\n" is followed by a space or a newline
            header=ALPACA_HEADER if alpaca else None,
            stopping=self.server.stopping,
        )

    def _run(self, gen: Generation, streaming: bool, chunk: Any, name: str, final: Any) -> None:
        """Stream NDJSON ``{"model", "created_at", **chunk(piece), "done": false}`` lines and the final
        object, or send the final object alone with the whole text."""
        pieces = iter(gen)
        try:
            if not streaming:
                self._send_json(final("".join(pieces)))
                return
            self._start_stream(_NDJSON)
            for piece in pieces:
                self._ndjson({"model": name, "created_at": _rfc3339(), **chunk(piece), "done": False})
            last = final("")
            self._ndjson(last)
            self._chunk(b"")
        finally:
            pieces.close()  # type: ignore[attr-defined]  # stops decoding when the client went away

    # -- OpenAI endpoints

    def _openai_models(self) -> None:
        data = [
            {"id": m.name, "object": "model", "created": int(m.modified_at), "owned_by": "gptlab"}
            for m in self.server.models.values()
        ]
        self._send_json({"object": "list", "data": data})

    def _openai_chat(self) -> None:
        body = self._json_body()
        name = _string(body, "model", required=True)
        assert name is not None
        m = self.server.find(name)
        messages = _messages(body.get("messages"), required=True)
        streaming = _boolean(body, "stream", False)
        n = _integer(body, "n", 1)
        if n != 1:
            raise HTTPError(400, f"only n=1 is supported, got {n}")
        if body.get("tools"):
            raise HTTPError(400, f"model {name!r} does not support tools")
        fmt = body.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise HTTPError(400, "only response_format {'type': 'text'} is supported")
        fields = dict(body)
        fields.pop("top_k", None)  # not an OpenAI parameter
        if body.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens
            fields["max_tokens"] = body["max_completion_tokens"]
        options = _decode_options(fields, OPENAI_SAMPLING, max_tokens_key="max_tokens")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise HTTPError(400, "field 'stream_options' must be an object")
        include_usage = _boolean(stream_options, "include_usage", False)
        gen = self._chat_generation(m, messages, options)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": name}

        def usage() -> dict[str, int]:
            return {
                "prompt_tokens": gen.prompt_eval_count,
                "completion_tokens": gen.eval_count,
                "total_tokens": gen.prompt_eval_count + gen.eval_count,
            }

        pieces = iter(gen)
        try:
            if not streaming:
                content = "".join(pieces)
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": gen.done_reason,
                }
                self._send_json({**base, "object": "chat.completion", "choices": [choice], "usage": usage()})
                return
            self._start_stream("text/event-stream")

            def event(choices: list[dict[str, Any]], **extra: Any) -> None:
                obj = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
                self._chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for piece in pieces:
                event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            event([{"index": 0, "delta": {}, "finish_reason": gen.done_reason}])
            if include_usage:
                event([], usage=usage())
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        finally:
            pieces.close()  # type: ignore[attr-defined]
