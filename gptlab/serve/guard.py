"""What ``gptlab serve`` refuses: foreign web pages, slow or stuck clients, more connections than it can hold.

* **Host and Origin** (DNS rebinding, cross-site requests): a page the user visits must not drive the local
  server. Bound to a loopback address, the server answers only requests whose ``Host`` is a loopback name
  (``localhost``, ``127.0.0.1``, ``[::1]``, ``*.localhost``) or one allowed with ``--allow-host`` /
  ``GPTLAB_HOSTS``; bound to another address, any ``Host`` (the user chose to expose it). A request that carries
  an ``Origin`` (browsers add it to cross-origin requests) must come from a loopback origin or one allowed with
  ``--allow-origin`` / ``GPTLAB_ORIGINS`` (``*`` allows all), as Ollama's ``OLLAMA_ORIGINS``. Anything else is a
  403 naming the header. Allowed origins also get CORS headers, so a page served from them can call the API.
* **Timeouts**: a request's head must arrive within ``read_timeout`` seconds of the connection opening (or of the
  previous response on a kept-alive connection), and its body within ``read_timeout`` of the head; otherwise
  the connection is closed (head) or answered 408 (body). Idle kept-alive connections close after 5 s.
* **Connections**: at most ``max_connections`` at once; past that new requests get a 503 straight away.
* **API key**: with a key (``GPTLAB_API_KEY`` or ``--api-key-file``) every request must carry
  ``Authorization: Bearer <key>`` (what OpenAI clients send from ``api_key``, and the ``ollama`` client from
  ``headers=``), else 401; CORS preflights, which browsers send without credentials, pass. A server bound to
  anything but loopback refuses to start without one: exposed, it must not be open to whoever can reach it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gptlab.errors import UserError
from gptlab.serve.http import error_payload, json_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class Limits:
    """The server's defences (module docstring); the defaults suit a server on one machine."""

    read_timeout: float = 10.0
    """Seconds allowed for a request's head, and again for its body."""
    max_connections: int = 256
    """Connections served at once; more are answered 503."""
    allow_hosts: list[str] = field(default_factory=list)
    """``Host`` names accepted besides the loopback names (for a loopback-bound server)."""
    allow_origins: list[str] = field(default_factory=list)
    """``Origin`` values accepted besides loopback origins; ``*`` accepts every origin."""
    api_key: str | None = field(default=None, repr=False)
    """The key every request must send as ``Authorization: Bearer <key>``; None: no key (loopback only)."""

    @classmethod
    def from_env(cls, api_key_file: str | os.PathLike | None = None, **overrides) -> Limits:
        """Defaults plus ``GPTLAB_HOSTS`` / ``GPTLAB_ORIGINS`` (comma-separated) and ``GPTLAB_API_KEY`` (or the
        first line of ``api_key_file``, which wins), then ``overrides``."""
        hosts = [h.strip() for h in os.environ.get("GPTLAB_HOSTS", "").split(",") if h.strip()]
        origins = [o.strip() for o in os.environ.get("GPTLAB_ORIGINS", "").split(",") if o.strip()]
        api_key = os.environ.get("GPTLAB_API_KEY", "").strip() or None
        if api_key_file is not None:
            lines = open(api_key_file, encoding="utf-8").read().splitlines()  # noqa: SIM115 (a tiny file)
            api_key = lines[0].strip() if lines else ""
            if not api_key:
                raise UserError(
                    f"--api-key-file {api_key_file}: the first line must hold the key; it is empty"
                )
        limits = cls(allow_hosts=hosts, allow_origins=origins, api_key=api_key)
        for key, value in overrides.items():
            if key in ("allow_hosts", "allow_origins"):
                getattr(limits, key).extend(value or [])
            elif value is not None:
                setattr(limits, key, value)
        if not limits.read_timeout > 0:
            raise ValueError(f"--read-timeout must be > 0 seconds, got {limits.read_timeout}")
        if limits.max_connections < 1:
            raise ValueError(f"--max-connections must be at least 1, got {limits.max_connections}")
        return limits


def require_key_when_exposed(bound_host: str, limits: Limits) -> None:
    """Refuse to serve beyond loopback without an API key (module docstring)."""
    if not is_loopback(bound_host) and not limits.api_key:
        raise UserError(
            f"--host {bound_host} exposes the server to other machines: give it an API key (GPTLAB_API_KEY=... or "
            "--api-key-file FILE); clients then send 'Authorization: Bearer <key>'"
        )


def key_matches(authorization: str | None, key: str) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(value: str) -> str:
    """The host of a ``Host`` header or an origin, without port or brackets."""
    return (urlsplit(value if "//" in value else f"//{value}").hostname or "").lower()


def origin_allowed(origin: str, limits: Limits) -> bool:
    if "*" in limits.allow_origins or origin in limits.allow_origins:
        return True
    return urlsplit(origin).scheme in ("http", "https") and is_loopback(_hostname(origin))


class HostOriginGuard:
    """ASGI middleware: 403 for a foreign ``Host`` (on a loopback-bound server) or a foreign ``Origin``; 401 for
    a missing or wrong API key when the server has one."""

    def __init__(self, app: ASGIApp, *, limits: Limits, bound_host: str) -> None:
        self.app, self.limits = app, limits
        self.check_host = is_loopback(bound_host)
        self.hosts = {h.lower() for h in limits.allow_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = None
        host = _hostname(headers.get("host", ""))
        if self.check_host and not (is_loopback(host) or host in self.hosts):
            problem = (
                f"host {headers.get('host')!r} is not allowed; allow it with --allow-host or GPTLAB_HOSTS"
            )
        origin = headers.get("origin")
        if problem is None and origin is not None and not origin_allowed(origin, self.limits):
            problem = f"origin {origin!r} is not allowed; allow it with --allow-origin or GPTLAB_ORIGINS"
        if problem is not None:
            await json_response(error_payload(scope["path"], 403, problem), 403)(scope, receive, send)
            return
        key = self.limits.api_key
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if key and not preflight and not key_matches(headers.get("authorization"), key):
            message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
            challenge = {"WWW-Authenticate": 'Bearer realm="gptlab"'}
            await json_response(error_payload(scope["path"], 401, message), 401, challenge)(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's head (:attr:`Limits.read_timeout`): a
    client that connects and sends nothing, or dribbles a partial head, is disconnected instead of holding
    the connection for ever."""

    read_timeout = Limits.read_timeout

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head on a kept-alive connection has the same deadline

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the head arrived: the body's deadline is the app's (a 408)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.read_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def timed_protocol(read_timeout: float) -> type[TimedH11Protocol]:
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout": read_timeout})
