"""The chat page's side of the Ollama REST API (https://github.com/ollama/ollama/blob/main/docs/api.md):
``GET /api/tags`` (the model picker) and ``POST /api/chat`` (streamed NDJSON), through the
official ``ollama`` client. Failures become :class:`ServerError` with a message fit to show in the page.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import ollama

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
FAILURES = (ConnectionError, httpx.TransportError, ollama.ResponseError)


class ServerError(Exception):
    """The server is unreachable or refused a request; ``str()`` is the message the page shows."""


@dataclass(frozen=True)
class Options:
    """Ollama's decoding ``options`` the page exposes (temperature 0 = greedy, top_k 0 = off)."""

    temperature: float = 0.8
    top_k: int = 40
    num_predict: int = 256

    def as_dict(self) -> dict[str, float | int]:
        return {
            "temperature": float(self.temperature),
            "top_k": int(self.top_k),
            "num_predict": int(self.num_predict),
        }


class Backend:
    """One Ollama-API server at ``url`` (``http://host:port``)."""

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--server {url!r}: expected a URL such as http://127.0.0.1:11434")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        # A proxy from the environment must not capture a loopback server; a remote one may need it.
        trust_env = parts.hostname not in LOOPBACK
        # A gptlab serve with an API key wants it as a bearer token (Ollama itself ignores the header).
        key = os.environ.get("GPTLAB_API_KEY", "").strip()
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self.client = ollama.Client(host=self.url, timeout=timeout, trust_env=trust_env, headers=headers)

    def _down(self) -> ServerError:
        return ServerError(
            f"Cannot reach the model server at {self.url}. Start one with "
            f"`gptlab serve --model NAME=CHECKPOINT_DIR` (or `ollama serve`), or pass `gptlab chat --server URL`; "
            "then press Refresh."
        )

    def _error(self, exc: Exception, model: str | None = None) -> ServerError:
        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404 and model:
                return ServerError(
                    f"The server at {self.url} has no model {model!r} ({exc.error}). Press Refresh and pick "
                    "one it serves."
                )
            if exc.status_code == 401:
                return ServerError(
                    f"The server at {self.url} wants an API key: start `gptlab chat` with GPTLAB_API_KEY set "
                    "to the key `gptlab serve` was given."
                )
            if exc.status_code < 0:  # an error sent inside the stream, after the reply had started
                return ServerError(f"The server at {self.url} stopped the reply: {exc.error}")
            return ServerError(
                f"The server at {self.url} refused the request (HTTP {exc.status_code}): {exc.error}"
            )
        if isinstance(exc, httpx.TimeoutException):  # reachable, but slower than the client waits
            return ServerError(f"The server at {self.url} did not answer in time ({type(exc).__name__}).")
        return (
            self._down()
        )  # ConnectionError (the client's own for a refused connection) or a transport error

    def models(self) -> list[str]:
        """The served models' names, as /api/tags lists them."""
        try:
            return [m.model for m in self.client.list().models if m.model]
        except FAILURES as exc:
            raise self._error(exc) from None

    def chat(self, model: str, messages: list[dict[str, str]], options: Options) -> Iterator[str]:
        """The reply to ``messages`` (the whole conversation), streamed as text pieces."""
        try:
            for part in self.client.chat(
                model=model, messages=messages, options=options.as_dict(), stream=True
            ):
                if part.message.content:
                    yield part.message.content
        except FAILURES as exc:
            raise self._error(exc, model) from None
