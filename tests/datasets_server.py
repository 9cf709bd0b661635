"""A real HTTP server on 127.0.0.1 for download tests, serving the real datasets from ``../shared``.

It speaks just enough HTTP to exercise what matters: Range/206/416, ETags, redirects, and scripted faults
(500s, connections cut mid-body, stalls) so retries and resume are tested over real sockets. The ``server``
fixture (in conftest.py) starts one per test.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class ServerState:
    root: Path
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    # One action per incoming /files request, consumed in order; "serve" once exhausted.
    # "500": fail; "cut": send cut_after body bytes then drop the connection; "stall": sleep before answering;
    # "hang": send cut_after body bytes, then nothing more for 60 s (a client to be killed mid-transfer).
    script: list[str] = field(default_factory=list)
    cut_after: int = 10_000
    etag: str | None = None
    linked_etag: str | None = None
    ignore_range: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            with state.lock:
                state.seen.append(Seen(self.path, dict(self.headers.items())))
            if self.path.startswith("/redirect/"):
                # Like the HF hub: the sha256 is on the redirect; the bytes come from another host.
                self.send_response(302)
                self.send_header(
                    "Location", state.url("/files/" + self.path.split("/", 2)[2], host="localhost")
                )
                if state.linked_etag:
                    self.send_header("X-Linked-Etag", state.linked_etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            name = self.path.removeprefix("/files/")
            file = state.root / name
            if not self.path.startswith("/files/") or "/" in name or not file.is_file():
                self.send_error(404, "Not Found")
                return
            with state.lock:
                action = state.script.pop(0) if state.script else "serve"
            if action == "500":
                self.send_error(500, "Internal Server Error")
                return
            if action == "stall":
                time.sleep(0.5)
            data = file.read_bytes()
            status, body = 200, data
            range_header = self.headers.get("Range")
            if range_header and not state.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, body = 206, data[start:]
            self.send_response(status)
            if status == 206:
                self.send_header(
                    "Content-Range", f"bytes {len(data) - len(body)}-{len(data) - 1}/{len(data)}"
                )
            self.send_header("Content-Length", str(len(body)))
            if state.etag:
                self.send_header("ETag", state.etag)
            self.end_headers()
            if action in ("cut", "hang"):
                self.wfile.write(body[: state.cut_after])
                self.wfile.flush()
                if action == "hang":
                    time.sleep(60)
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serve(root: Path) -> Iterator[ServerState]:
    """Serve ``root`` as ``/files/<name>`` until the block ends."""
    state = ServerState(root=root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
