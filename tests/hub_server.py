"""A stand-in for the Hugging Face hub on 127.0.0.1, serving local files as ``huggingface_hub`` reads them.

``/<repo>/resolve/<revision>/<file>``: HEAD answers with the commit and the ETag (an LFS file's sha256 for
``.safetensors``, a git blob id otherwise), GET with the bytes; a missing file is a 404 with the hub's
``X-Error-Code: EntryNotFound``, so optional files are told apart from a dead server.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

COMMIT = "4f5c2ab1e0c9bd04a2be3d2f7e5d8b0c6e7a9f11"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args, files: dict[str, Path], bad_etag: bool, **kwargs) -> None:
        self.files, self.bad_etag = files, bad_etag
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def _head(self) -> bytes | None:
        repo_path = self.path.lstrip("/").replace(f"/resolve/{COMMIT}/", "/resolve/main/")
        path = self.files.get(repo_path.replace("/resolve/main/", "/", 1))
        if path is None or not path.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", COMMIT)
        if path.suffix == ".safetensors":
            digest = "0" * 64 if self.bad_etag else hashlib.sha256(data).hexdigest()
            self.send_header("X-Linked-Etag", f'"{digest}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.end_headers()
        return data

    def do_HEAD(self) -> None:
        self._head()

    def do_GET(self) -> None:
        data = self._head()
        if data is not None:
            self.wfile.write(data)


def serve_hub(files: dict[str, Path], *, bad_etag: bool = False) -> http.server.ThreadingHTTPServer:
    """Start serving ``files`` (``"org/name/file"`` -> local path) in a thread; ``shutdown()`` when done."""
    handler = functools.partial(HubHandler, files=files, bad_etag=bad_etag)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
