"""``gptlab serve`` under load and against hostile or broken clients: 64 concurrent clients, foreign Host/Origin,
truncated bodies, stuck headers, too many connections. Every wait is bounded; nothing here is timed for speed."""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.serve.app import make_server
from gptlab.serve.guard import Limits, is_loopback, origin_allowed

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, gpt2_tiktoken_file: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("guard") / "tiny"
    save_checkpoint(GPT(GPTConfig.from_name("gpt-micro", n_layer=1)), path)
    return path


@pytest.fixture
def server(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, gpt2_tiktoken_file: Path):
    monkeypatch.setenv("GPTLAB_TIKTOKEN_FILE", str(gpt2_tiktoken_file))
    running = []

    def start(**limits):
        srv = make_server({"tiny": checkpoint}, log=io.StringIO(), limits=Limits(**limits)).start()
        running.append(srv)
        return srv

    yield start
    for srv in running:
        srv.stop()


def post(port: int, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST"
    )
    for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
        req.add_header(key, value)
    try:
        with _opener.open(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def answer(port: int, kind: str, prompt: str, stream: bool) -> str:
    options = {"temperature": 0, "num_predict": 12}
    if kind == "generate":
        body = {"model": "tiny", "prompt": prompt, "stream": stream, "options": options}
    else:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
            "options": options,
        }
    status, _, data = post(port, f"/api/{kind}", body)
    assert status == 200, data
    lines = [json.loads(line) for line in data.decode().splitlines()]
    key = (lambda x: x["response"]) if kind == "generate" else (lambda x: x["message"]["content"])
    return "".join(key(x) for x in lines)


def test_64_concurrent_clients_get_their_single_client_answers(server) -> None:
    srv = server()
    jobs = [
        (kind, f"Question {i} is", stream)
        for i in range(16)
        for kind in ("generate", "chat")
        for stream in (True, False)
    ]
    assert len(jobs) == 64
    alone = {job: answer(srv.port, *job) for job in jobs}
    with ThreadPoolExecutor(max_workers=64) as pool:
        together = dict(zip(jobs, pool.map(lambda job: answer(srv.port, *job), jobs), strict=True))
    assert together == alone  # no connection error raised, every greedy answer equal to the one-client answer
    assert len(set(alone.values())) > 1


def test_a_cross_site_request_is_refused(server) -> None:
    srv = server()
    body = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
    # The simple cross-site request a web page can send: text/plain, its own Origin, a rebound Host.
    hostile = {"Content-Type": "text/plain", "Origin": "http://attacker.example", "Host": "attacker.example"}
    status, _, data = post(srv.port, "/api/generate", body, hostile)
    assert status == 403 and "host 'attacker.example' is not allowed" in json.loads(data)["error"]
    status, _, data = post(srv.port, "/api/generate", body, {"Origin": "http://attacker.example"})
    assert status == 403 and "origin 'http://attacker.example' is not allowed" in json.loads(data)["error"]
    status, headers, _ = post(srv.port, "/api/generate", body, {"Origin": "http://localhost:3000"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    assert post(srv.port, "/api/generate", body)[0] == 200  # curl and the ollama client send no Origin


def test_allowed_origins_and_hosts_are_extendable(server) -> None:
    srv = server(allow_origins=["http://chat.example:8080"], allow_hosts=["gptlab.internal"])
    body = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
    headers = {"Origin": "http://chat.example:8080", "Host": "gptlab.internal:11434"}
    assert post(srv.port, "/api/generate", body, headers)[0] == 200
    assert Limits.from_env(allow_origins=["x"]).allow_origins == ["x"]


def test_a_truncated_body_gets_408_instead_of_hanging(server) -> None:
    srv = server(read_timeout=1.0)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b'POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"model"')
        reply = b""
        while chunk := s.recv(4096):  # headers and body may arrive in separate packets: read until closed
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"not received within 1 s (8 of 100 bytes)" in reply


def test_a_client_stuck_in_its_headers_is_disconnected(server) -> None:
    srv = server(read_timeout=1.0)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /api/gen")
        start = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server, no response
    assert time.monotonic() - start < 8


def test_connections_past_the_limit_get_503(server) -> None:
    srv = server(max_connections=2, read_timeout=5.0)
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)
        status, _, _ = post(srv.port, "/api/tags", {})
        assert status == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and post(srv.port, "/api/version", {})[0] == 503:
        time.sleep(0.05)
    assert post(srv.port, "/api/version", {})[0] == 405  # served again (POST on a GET route)


def test_loopback_and_origin_rules() -> None:
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.5.0.1", "[::1]", "app.localhost"]))
    assert not any(map(is_loopback, ["attacker.example", "10.0.0.1", "localhost.example"]))
    limits = Limits()
    assert origin_allowed("http://127.0.0.1:5173", limits) and origin_allowed("https://localhost", limits)
    assert not origin_allowed("null", limits) and not origin_allowed("file://", limits)
    assert origin_allowed("null", Limits(allow_origins=["*"]))


def test_an_api_key_is_required_from_every_client(server, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "k-" + "x" * 40
    srv = server(api_key=key)
    body = {"model": "tiny", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    status, headers, raw = post(srv.port, "/api/generate", body)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in json.loads(raw)["error"]
    assert post(srv.port, "/api/generate", body, {"Authorization": "Bearer wrong"})[0] == 401
    assert post(srv.port, "/api/generate", body, {"Authorization": f"Basic {key}"})[0] == 401
    assert post(srv.port, "/api/generate", body, {"Authorization": f"Bearer {key}"})[0] == 200
    # OpenAI's shape: the 401 is an OpenAI error object; the client's api_key is the bearer token.
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, _, raw = post(srv.port, "/v1/chat/completions", chat)
    assert status == 401 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, _, raw = post(srv.port, "/v1/chat/completions", chat, {"Authorization": f"Bearer {key}"})
    assert status == 200 and json.loads(raw)["object"] == "chat.completion"
    # The official ollama client passes it as a header; so does the chat page, from GPTLAB_API_KEY.
    import ollama

    from gptlab.chatui.backend import Backend, ServerError

    assert [
        m.model for m in ollama.Client(host=srv.url, headers={"Authorization": f"Bearer {key}"}).list().models
    ]
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=srv.url).list()
    assert refused.value.status_code == 401
    monkeypatch.delenv("GPTLAB_API_KEY", raising=False)
    with pytest.raises(ServerError, match="wants an API key"):
        Backend(srv.url).models()
    monkeypatch.setenv("GPTLAB_API_KEY", key)
    assert Backend(srv.url).models() == ["tiny:latest"]


def test_beyond_loopback_the_server_refuses_to_start_without_a_key(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from gptlab.cli import main

    monkeypatch.delenv("GPTLAB_API_KEY", raising=False)
    with pytest.raises(ValueError, match="exposes the server"):  # refused before binding anything
        make_server({"tiny": checkpoint}, host="0.0.0.0", limits=Limits())
    assert main(["serve", "--model", f"tiny={checkpoint}", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GPTLAB_API_KEY" in err and "Traceback" not in err
    empty = tmp_path / "key"
    empty.write_text("\n")
    assert main(["serve", "--model", f"tiny={checkpoint}", "--api-key-file", str(empty), "--port", "0"]) == 2
    assert "first line must hold the key" in capsys.readouterr().err
    key_file = tmp_path / "key2"
    key_file.write_text("secret-key\n")
    assert Limits.from_env(api_key_file=key_file).api_key == "secret-key"
    monkeypatch.setenv("GPTLAB_API_KEY", " from-env ")
    assert Limits.from_env().api_key == "from-env" and "from-env" not in repr(Limits.from_env())
