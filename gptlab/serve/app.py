"""``gptlab serve``: the Ollama-compatible server as a Starlette app run by uvicorn.

:func:`create_app` builds the ASGI app over loaded models; :class:`Server` binds a socket and runs it (in the
foreground for the CLI, or in a background thread for tests and notebooks); :func:`serve` is the CLI. Every
request is logged as one line (time, client, method, path, status, duration) to ``log`` (stderr by default).
The model store endpoints (``/api/pull``, ``/api/create``, ``/api/delete``, ...) answer 501: the served models
are fixed at start-up. The server binds 127.0.0.1 unless told otherwise; bound beyond loopback it requires an
API key (:mod:`gptlab.serve.guard`).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptlab.serve import ollama_api, openai_api
from gptlab.serve.batching import DEFAULT_MAX_BATCH, Batcher
from gptlab.serve.guard import HostOriginGuard, Limits, require_key_when_exposed, timed_protocol
from gptlab.serve.http import NOTE, endpoint, error_response
from gptlab.serve.models import DEFAULT_HOST, DEFAULT_PORT, ServedModel, load_models
from gptlab.serve.requests import ApiError

# Ollama endpoints that manage a model store; there is none here (the models are fixed at start-up).
STORE_ENDPOINTS = (
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/embed",
    "/api/embeddings",
)
_log_lock = threading.Lock()


class RequestLog:
    """ASGI middleware: one line per request, written when its response has been sent (or abandoned)."""

    def __init__(self, app: ASGIApp, log: IO[str]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            path = scope["path"] + (f"?{query}" if query else "")
            client = (scope.get("client") or ("-", 0))[0]
            note = scope.get(NOTE, "")
            line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {client} {scope['method']} {path} {status} "
            with _log_lock:
                self.log.write(f"{line}{time.perf_counter() - start:.3f}s{note}\n")
                self.log.flush()


async def _not_implemented(request: Request) -> Response:
    models = ", ".join(request.app.state.models)
    message = f"gptlab serve does not implement {request.url.path}: it serves only the checkpoints given with --model ({models})"
    return error_response(request.url.path, ApiError(501, message))


async def _routing_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 405:
        allowed = tuple((exc.headers or {}).get("Allow", "").replace(" ", "").split(","))
        return error_response(
            path, ApiError(405, f"method {request.method} not allowed for {path}", allow=allowed)
        )
    return error_response(path, ApiError(exc.status_code, f"no such endpoint: {path}"))


def create_app(
    models: Mapping[str, ServedModel],
    *,
    log: IO[str] | None = None,
    limits: Limits | None = None,
    bound_host: str = DEFAULT_HOST,
) -> Starlette:
    """The ASGI app serving ``models`` (canonical ``name:tag`` -> :class:`ServedModel`); ``app.state`` holds
    ``models``, ``log``, ``limits`` and ``stopping`` (set it to end running generations)."""
    log = log or sys.stderr
    limits = limits or Limits.from_env()
    routes = [
        Route(path, endpoint(handler), methods=list(methods))
        for path, (methods, handler) in {**ollama_api.ROUTES, **openai_api.ROUTES}.items()
    ]
    any_method = ["GET", "HEAD", "POST", "PUT", "DELETE"]
    routes += [Route(path, endpoint(_not_implemented), methods=any_method) for path in STORE_ENDPOINTS]
    middleware = [
        Middleware(RequestLog, log=log),
        Middleware(HostOriginGuard, limits=limits, bound_host=bound_host),
        # Pages from allowed origins (loopback, --allow-origin) may call the API from a browser.
        Middleware(
            CORSMiddleware,
            allow_origins=limits.allow_origins,
            allow_origin_regex=r"https?://(localhost|127\.0\.0\.1|\[::1\]|[^/]+\.localhost)(:\d+)?",
            allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
            allow_headers=["*"],
        ),
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _routing_error})
    app.state.models = dict(models)
    app.state.log = log
    app.state.limits = limits
    app.state.stopping = threading.Event()
    return app


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.stopping.set()  # running generations end at their next step instead of holding the shutdown
        super().handle_exit(sig, frame)


class Server:
    """The app on a bound socket: :meth:`run` in the foreground, or :meth:`start` / :meth:`stop` in a thread.

    Binding happens here, so a port in use is an OSError at construction, not a log line later. ``port=0``
    picks a free port (:attr:`port`). :meth:`stop` ends running generations at their next decoding step (a
    stream reports ``{"error": "the server is shutting down"}`` in-band) and waits for every connection.
    ``max_batch`` > 1 gives every model a :class:`Batcher`: up to that many requests decode together;
    1 decodes each request alone (forward passes serialized step by step).
    """

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        log: IO[str] | None = None,
        limits: Limits | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        self.limits = limits or Limits.from_env()
        require_key_when_exposed(host, self.limits)
        self.models = dict(models)
        for served in self.models.values():
            served.batcher = Batcher(served, max_batch) if max_batch > 1 else None
        self.app = create_app(self.models, log=log, limits=self.limits, bound_host=host)
        self.stopping: threading.Event = self.app.state.stopping
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            http=timed_protocol(self.limits.read_timeout),
            limit_concurrency=self.limits.max_connections,
            backlog=2048,  # bursts of clients queue in the kernel instead of being reset
            timeout_keep_alive=5,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=30,
        )
        self._uvicorn = _Uvicorn(config, self.stopping)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until Ctrl-C / SIGTERM (a graceful shutdown)."""
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self.close_batchers()

    def close_batchers(self) -> None:
        for served in self.models.values():
            if served.batcher is not None:
                served.batcher.close()

    def start(self) -> Server:
        """Serve in a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.run, name="gptlab-serve", daemon=True)
        self._thread.start()
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("gptlab serve failed to start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.close_batchers()
        self.socket.close()


def make_server(
    models: Mapping[str, str | Path],
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    device: str | torch.device = "cpu",
    log: IO[str] | None = None,
    limits: Limits | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Server:
    """Load every model (fail fast: one ValueError naming the bad directory) and bind ``host:port``."""
    limits = limits or Limits.from_env()
    require_key_when_exposed(host, limits)  # before the models load: the refusal comes at once
    return Server(load_models(models, device=device), host, port, log=log, limits=limits, max_batch=max_batch)


def serve(
    models: Mapping[str, str | Path],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str | torch.device = "cpu",
    limits: Limits | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> None:
    """``gptlab serve``: load, print the URL, serve until Ctrl-C."""
    server = make_server(models, host, port, device=device, limits=limits, max_batch=max_batch)
    first = next(iter(server.models)).removesuffix(":latest")
    shown = server.url.removeprefix("http://")
    # stdout, flushed: a script that asked for --port 0 can read the URL from here.
    print(f"gptlab serve: listening on {server.url} (Ctrl-C stops)", flush=True)
    print(f"  models: {', '.join(server.models)}", flush=True)
    print(f'  try:    OLLAMA_HOST={shown} ollama run {first} "Hello"', flush=True)
    if server.limits.api_key:
        print("  auth:   clients send 'Authorization: Bearer <key>' (the key is not shown)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.socket.close()
    print("gptlab serve: stopped", file=sys.stderr)
