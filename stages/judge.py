"""LLM-as-a-judge scoring of instruction responses through Ollama (book ch. 7.8, "Evaluating the finetuned LLM").

The book asks Llama 3 (served by Ollama) to score each test-set response from 0 to 100 against the reference
output, with the prompt reproduced exactly by :func:`judge_prompt`, and reports the average score. This module
does the same through the official ``ollama`` Python client, with what a pipeline stage needs on top:

* :func:`stages.scores.parse_score` turns a judge reply into an int in 0..100 or None (never guesses);
* :class:`JudgmentCache`, an append-only JSONL file, so a rerun (or a run resumed after a kill) re-asks nothing;
* :func:`score_responses`: bounded concurrency, results in input order, retries with exponential backoff on
  network errors and 5xx, one re-ask for an unparsable reply, and :class:`JudgeUnavailableError` (a one-line
  message saying how to start Ollama) when the judge cannot be reached;
* the summaries of the scores live beside the parser, in :mod:`stages.scores`.

Determinism: the book sends ``temperature 0``, ``seed 123`` and ``num_ctx 2048``; so do we (:class:`JudgeConfig`).
By default the request also carries a JSON schema as Ollama's ``format`` (structured outputs, Ollama >= 0.5),
which constrains the reply to ``{"score": <int>}``; the prompt text itself stays the book's. Even so the book's
own judge score drifts between re-runs, so a run records what makes it repeatable: the judge model's digest
(:func:`check_judge`), every option sent (:func:`request_options`), the raw replies, and with ``repeats: N``
each question asked N times (:func:`stages.scores.summarize_repeats`: mean ± std per response and set).
Cached answers are keyed by all of that (:func:`judge_identity`), so a re-pulled model with a new digest is
asked again.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
from tqdm.auto import tqdm

from gptlab.errors import UserError
from gptlab.prompts import format_input
from stages.scores import parse_score

__all__ = [
    "SCORE_SCHEMA",
    "JudgeConfig",
    "JudgeUnavailableError",
    "JudgmentCache",
    "check_judge",
    "judge_identity",
    "judge_prompt",
    "request_options",
    "score_responses",
]

SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["score"],
}


# --- prompt -------------------------------------------------------------------------------------------------


def judge_prompt(entry: dict, response: str) -> str:
    """The book's judge prompt (ch. 7.8) for one test record and the model's response, character for character."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{response}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


# --- cache --------------------------------------------------------------------------------------------------


def _cache_key(judge: str, prompt: str) -> str:
    return hashlib.sha256(f"{judge}\0{prompt}".encode()).hexdigest()


class JudgmentCache:
    """Append-only JSONL file keyed by ``sha256(judge + "\\0" + prompt)``; thread-safe; survives restarts.

    ``judge`` is :func:`judge_identity`: the model name and digest, the options sent, the output format and
    the repeat index, so an answer is reused only for the same question to the same weights asked the same
    way. Each line is ``{"key", "judge", "prompt", "score", "reply"}`` (the prompt is kept so the file can be
    audited). :meth:`get` returns ``{"score": int | None, "reply": str}`` or None; :meth:`put` appends a line
    and flushes it (a killed process loses at most the line being written; there is no fsync, so a power
    loss may lose more). A key written twice resolves to the last line. ``"llama3"`` and ``"llama3:latest"``
    are different names.

    Loading: a last line cut off by a killed run (no trailing newline, not valid JSON) is dropped from the file
    with a warning, so the next append starts on a clean line; any other unreadable line is skipped with a
    warning and left in place. One process at a time: threads share an instance, processes must not share a
    file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # After the split, the last element is b"" when the file ends in a newline, else an unterminated line.
        tail = lines.pop()
        for number, raw in enumerate(lines, start=1):
            if raw.strip():
                self._ingest(raw, number)
        if tail.strip() and not self._ingest(tail, len(lines) + 1, warn=False):
            warnings.warn(
                f"{self.path}: line {len(lines) + 1} is truncated (an interrupted run?); dropping it",
                RuntimeWarning,
                stacklevel=3,
            )
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(tail))
        elif tail:
            # A complete record (or blank text) without its newline: terminate it so appends stay separate.
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def _ingest(self, raw: bytes, number: int, *, warn: bool = True) -> bool:
        try:
            line = json.loads(raw)
            key, score, reply = line["key"], line["score"], line["reply"]
            if not isinstance(key, str) or not isinstance(reply, str):
                raise TypeError("key and reply must be strings")
            if score is not None and (isinstance(score, bool) or not isinstance(score, int)):
                raise TypeError("score must be an int or null")
        except (ValueError, KeyError, TypeError) as e:
            if warn:
                warnings.warn(
                    f"{self.path}: skipping unreadable line {number} ({e})", RuntimeWarning, stacklevel=4
                )
            return False
        self._records[key] = {"score": score, "reply": reply}
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def get(self, judge: str, prompt: str) -> dict[str, Any] | None:
        """``{"score", "reply"}`` stored for this judge and prompt (a copy), or None."""
        with self._lock:
            record = self._records.get(_cache_key(judge, prompt))
            return dict(record) if record is not None else None

    def put(self, judge: str, prompt: str, record: dict[str, Any]) -> None:
        """Store ``record`` (``{"score": int | None, "reply": str}``; other keys are ignored) and append it."""
        score, reply = record["score"], record["reply"]
        if score is not None and (isinstance(score, bool) or not isinstance(score, int)):
            raise TypeError(f"score must be an int or None, got {score!r}")
        if not isinstance(reply, str):
            raise TypeError(f"reply must be a str, got {type(reply).__name__}")
        key = _cache_key(judge, prompt)
        line = json.dumps({"key": key, "judge": judge, "prompt": prompt, "score": score, "reply": reply})
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One write of one whole line, then flush: what a kill can leave is a torn last line, which
            # _load drops.
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
            self._records[key] = {"score": score, "reply": reply}


# --- client -------------------------------------------------------------------------------------------------


@dataclass
class JudgeConfig:
    """How to reach and query the judge. ``retries`` is the number of re-tries after a failed request (network
    error, timeout, HTTP 429/5xx), so a request is sent at most ``1 + retries`` times, sleeping
    ``backoff * 2**k`` seconds before re-try ``k`` (0-based). ``timeout`` is per HTTP request."""

    host: str = "http://127.0.0.1:11434"
    model: str = "llama3"
    temperature: float = 0.0
    seed: int = 123
    num_ctx: int = 2048
    """Context window Ollama gives the judge (the book's ``query_model`` sends 2048)."""
    repeats: int = 1
    """Ask each question this many times (same request) to measure how repeatable the judge is."""
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    concurrency: int = 4
    use_schema: bool = True

    def __post_init__(self) -> None:
        for name in ("repeats", "num_ctx"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be an int >= 1, got {value!r}")
        if (
            isinstance(self.concurrency, bool)
            or not isinstance(self.concurrency, int)
            or self.concurrency < 1
        ):
            raise UserError(f"concurrency must be an int >= 1, got {self.concurrency!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise UserError(f"retries must be an int >= 0, got {self.retries!r}")
        if not self.timeout > 0:
            raise UserError(f"timeout must be > 0, got {self.timeout!r}")
        if not self.backoff >= 0:
            raise UserError(f"backoff must be >= 0, got {self.backoff!r}")
        if not self.model:
            raise UserError("model must be a non-empty judge model name, e.g. 'llama3'")


class JudgeUnavailableError(UserError, RuntimeError):
    """The judge cannot be used: Ollama is unreachable, keeps failing, or lacks the model. One-line message."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reason(exc: BaseException) -> str:
    # ollama turns httpx.ConnectError into a generic ConnectionError "from None"; the original (e.g.
    # "[Errno 111] Connection refused") is still on __context__ and says more.
    inner = exc.__context__ if isinstance(exc, ConnectionError) and exc.__context__ is not None else exc
    detail = _one_line(str(inner)) or type(inner).__name__
    return f"{type(inner).__name__}: {detail}" if detail != type(inner).__name__ else detail


def _unreachable(cfg: JudgeConfig, exc: BaseException, what: str = "is unreachable") -> JudgeUnavailableError:
    return JudgeUnavailableError(
        f"judge at {cfg.host} {what}: {_reason(exc)}; start Ollama with `ollama serve` and "
        f"`ollama pull {cfg.model}`"
    )


def _missing_model(cfg: JudgeConfig) -> JudgeUnavailableError:
    return JudgeUnavailableError(
        f"model {cfg.model} not available at {cfg.host}; run `ollama pull {cfg.model}`"
    )


def _canonical_model(name: str) -> str:
    # Ollama lists "llama3:latest" for a model pulled as "llama3". The tag is after the last ":" of the last
    # path segment ("host:port/ns/model" has a ":" that is not a tag).
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def request_options(cfg: JudgeConfig) -> dict[str, Any]:
    """The Ollama ``options`` every judge request carries."""
    return {"temperature": cfg.temperature, "seed": cfg.seed, "num_ctx": cfg.num_ctx}


def judge_identity(cfg: JudgeConfig, digest: str | None, repeat: int = 0) -> str:
    """What makes two judge answers comparable, as a canonical JSON string (the cache's key part): model name
    and weights digest, options, output format and which repeat."""
    return json.dumps(
        {
            "model": cfg.model,
            "digest": digest,
            "options": request_options(cfg),
            "schema": cfg.use_schema,
            "repeat": repeat,
        },
        sort_keys=True,
    )


def check_judge(cfg: JudgeConfig) -> str | None:
    """Fail fast, before any scoring: the Ollama server answers and has ``cfg.model``; returns its digest.

    Lists the server's models (``GET /api/tags``) with a short timeout (``min(cfg.timeout, 5)`` s). Raises
    :class:`JudgeUnavailableError`: ``judge at <host> is unreachable: <reason>; start Ollama with `ollama serve`
    and `ollama pull <model>``` or ``model <m> not available at <host>; run `ollama pull <m>```. Names are
    compared with ``:latest`` added where no tag is given. The digest (the sha256 Ollama lists for the model's
    weights; None if the server gives none) identifies exactly which judge answered.
    """
    client = ollama.Client(host=cfg.host, timeout=min(cfg.timeout, 5.0))
    try:
        listed = client.list()
    except (ConnectionError, httpx.HTTPError, ollama.ResponseError, ValueError) as e:
        # ValueError: a reply that is not Ollama's JSON (something else listens on that port).
        raise _unreachable(cfg, e) from e
    finally:
        client.close()
    available = {_canonical_model(m.model): m.digest for m in listed.models if m.model}
    if _canonical_model(cfg.model) not in available:
        raise _missing_model(cfg)
    return available[_canonical_model(cfg.model)] or None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ollama.ResponseError):
        return exc.status_code == 429 or exc.status_code >= 500
    # ConnectionError: ollama's wrapper for a refused connection; httpx.TransportError: timeouts, resets,
    # a connection dropped mid-reply.
    return isinstance(exc, ConnectionError | httpx.TransportError)


class _RejectedError(JudgeUnavailableError):
    """The server refused the request itself (HTTP 4xx other than 404/429): retrying the same request is futile."""

    def __init__(self, message: str, requests: int) -> None:
        super().__init__(message)
        self.requests = requests


class _Judge:
    """Sends generate requests with retries; one ``ollama.Client`` per worker thread (httpx clients are
    thread-safe, but one each keeps the connection pools independent and cheap to reason about)."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        self._local = threading.local()
        self._clients: list[ollama.Client] = []
        self._lock = threading.Lock()

    def _client(self) -> ollama.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = ollama.Client(host=self.cfg.host, timeout=self.cfg.timeout)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    def generate(self, prompt: str, *, schema: bool) -> tuple[str, int]:
        """The reply text and how many requests it took; JudgeUnavailableError once retries are exhausted."""
        cfg = self.cfg
        last: BaseException | None = None
        for attempt in range(cfg.retries + 1):
            try:
                reply = self._client().generate(
                    model=cfg.model,
                    prompt=prompt,
                    format=SCORE_SCHEMA if schema else None,
                    options=request_options(cfg),
                    stream=False,
                )
                return reply.response or "", attempt + 1
            except ollama.ResponseError as e:
                if e.status_code == 404:
                    raise _missing_model(cfg) from e  # Ollama's "model 'x' not found": retrying won't help
                if not _retryable(e):
                    hint = (
                        " (an Ollama older than 0.5 rejects a JSON-schema `format`: upgrade it or set use_schema=False)"
                        if schema and e.status_code == 400
                        else ""
                    )
                    raise _RejectedError(
                        f"judge at {cfg.host} rejected the request: {_one_line(str(e))}{hint}", attempt + 1
                    ) from e
                last = e
            except (ConnectionError, httpx.TransportError) as e:
                last = e
            if attempt < cfg.retries:
                time.sleep(cfg.backoff * 2**attempt)
        assert last is not None  # the loop runs at least once and only falls through after a failure
        raise _unreachable(cfg, last, f"failed {cfg.retries + 1} times")

    def judge(self, prompt: str) -> dict[str, Any]:
        """Ask once; if the reply has no score, ask once more with the other output format.

        With temperature 0 and a fixed seed the identical request would most likely return the identical
        unparsable reply, so the re-ask flips ``format``: a schema-constrained reply that failed (e.g.
        ``{"score": 150}``) is re-asked as the book's plain-text prompt, and a plain-text reply that failed is
        re-asked with the schema, which constrains the output to ``{"score": <int>}``. The second reply is
        final, parsed or not. If the server refuses the schema on that re-ask (an Ollama older than 0.5, the
        likely reason ``use_schema`` is off), the first reply stands as the unparsed answer.
        """
        reply, requests = self.generate(prompt, schema=self.cfg.use_schema)
        score = parse_score(reply)
        if score is None:
            try:
                reply, more = self.generate(prompt, schema=not self.cfg.use_schema)
            except _RejectedError as e:
                if self.cfg.use_schema:
                    raise  # the plain request was refused: not a format problem
                more = e.requests
            requests += more
            score = parse_score(reply)
        return {"score": score, "reply": reply, "attempts": requests}


def score_responses(
    items: list[tuple[dict, str]],
    cfg: JudgeConfig,
    cache: JudgmentCache,
    *,
    digest: str | None = None,
    repeat: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Judge each ``(entry, response)``; per item ``{"score": int | None, "reply": str, "cached": bool,
    "attempts": int}``, in input order. ``digest`` (from :func:`check_judge`) and ``repeat`` (which of
    ``cfg.repeats`` asks this is) are part of the cache key, :func:`judge_identity`.

    * The prompt is :func:`judge_prompt`. A cache hit (same judge identity and prompt) is reused without a
      request: ``cached`` True, ``attempts`` 0. Items with identical prompts in one call are asked once; the
      repeats count as cached.
    * Otherwise ``ollama.Client.generate`` with ``format=SCORE_SCHEMA`` (if ``cfg.use_schema``),
      ``options=request_options(cfg)``, ``stream=False``. A reply :func:`parse_score` cannot read is
      re-asked once with the other format (see :meth:`_Judge.judge`); if that fails too the item keeps
      ``score`` None and the last reply: recorded as unparsed, never dropped or invented.
    * ``attempts`` counts the HTTP requests sent for the item, network re-tries included.
    * Every final answer, parsed or not, goes into ``cache`` as soon as it arrives, so a run that dies part
      way resumes where it stopped.
    * Network errors, timeouts and HTTP 429/5xx are re-tried (see :class:`JudgeConfig`); when retries run out,
      or the model is missing (HTTP 404), :class:`JudgeUnavailableError` is raised, queued items are cancelled
      and items already in flight still finish and are cached.
    * At most ``cfg.concurrency`` requests in flight (a thread pool); a tqdm bar unless ``progress`` is False.
    """
    identity = judge_identity(cfg, digest, repeat)
    prompts = [judge_prompt(entry, response) for entry, response in items]
    results: list[dict | None] = [None] * len(items)
    pending: dict[str, list[int]] = {}  # prompt -> indices waiting for it (in input order)
    for i, prompt in enumerate(prompts):
        if prompt in pending:
            pending[prompt].append(i)
            continue
        hit = cache.get(identity, prompt)
        if hit is not None:
            results[i] = {"score": hit["score"], "reply": hit["reply"], "cached": True, "attempts": 0}
        else:
            pending[prompt] = [i]

    judge = _Judge(cfg)

    def work(prompt: str) -> dict[str, Any]:
        answer = judge.judge(prompt)
        cache.put(identity, prompt, answer)
        return answer

    desc = f"judge {cfg.model}" + (f" ({repeat + 1}/{cfg.repeats})" if cfg.repeats > 1 else "")
    bar = tqdm(total=len(items), desc=desc, unit="resp", disable=not progress)
    bar.update(len(items) - sum(len(v) for v in pending.values()))
    executor = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="judge")
    try:
        futures: dict[Future, str] = {executor.submit(work, prompt): prompt for prompt in pending}
        not_done = set(futures)
        while not_done:
            done, not_done = wait(not_done, return_when=FIRST_EXCEPTION)
            for future in done:
                answer = future.result()  # re-raises JudgeUnavailableError; the finally cancels the rest
                first, *repeats = pending[futures[future]]
                results[first] = {**answer, "cached": False}
                for i in repeats:
                    results[i] = {
                        "score": answer["score"],
                        "reply": answer["reply"],
                        "cached": True,
                        "attempts": 0,
                    }
                bar.update(1 + len(repeats))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        judge.close()
        bar.close()
    return results  # type: ignore[return-value]
