"""Processes the end-to-end tests run in the background (servers, served deployments): a free loopback port,
bounded waits, a process group that is always shut down, and the tail of its log for failure messages."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; bounded, so a hang fails instead of blocking CI."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.contextmanager
def background(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A subprocess in its own process group (uvicorn and flow-run children included), always shut down."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        for sig, grace in (
            (signal.SIGTERM, 20),
            (signal.SIGKILL, 10),
        ):  # graceful first: serve pauses its schedule
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                break


def tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, local artifacts under ``root``) on a free loopback port; yields
    its URL."""
    import sys
    import urllib.request

    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    # No job runner: it starts eight more processes (server-side GenAI evaluation jobs) the tests never use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return True
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(tail(root / "server.log")) from None
            return False

    with background(cmd, root, env, root / "server.log") as proc:
        wait_for(healthy, 120, "mlflow server")
        yield url


def mlflow_api(url: str, path: str, body: dict | None = None) -> dict:
    """MLflow's REST API (``/api/2.0/mlflow/<path>``): GET without ``body``, else POST it as JSON."""
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)
