"""``gptlab serve``: the Ollama-compatible HTTP server, exercised with the official ``ollama`` client and urllib.

One server (127.0.0.1, a free port, background thread) serves tiny random checkpoints for the whole module.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ollama
import pytest
import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.generate import generate
from gptlab.model import GPT
from gptlab.prompts import format_input, format_response
from gptlab.serve.app import Server, make_server
from gptlab.serve.decoding import TextFilter
from gptlab.serve.models import parse_model_arg, render_chat_prompt, render_generate_prompt
from gptlab.tokenizer import EOT_ID, GPT2Tokenizer, decode, encode

GREEDY = {"temperature": 0, "num_predict": 20}


def _tiny(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("gpt-micro", n_layer=1)).eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, gpt2_tiktoken_file: Path):
    """Checkpoints + a running server; yields a dict with the port, the models and the request log."""
    root = tmp_path_factory.mktemp("serve")
    plain, alpaca = _tiny(0), _tiny(1)
    save_checkpoint(plain, root / "tiny")
    save_checkpoint(alpaca, root / "sft", meta={"stage": "sft", "prompt_format": "alpaca"})
    log = io.StringIO()
    # The module fixture outlives conftest's per-test monkeypatch: point the tokenizer at the file here.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTLAB_TIKTOKEN_FILE", str(gpt2_tiktoken_file))
        server = make_server({"tiny": root / "tiny", "sft:latest": root / "sft"}, log=log).start()
        try:
            yield {"port": server.port, "plain": plain, "root": root, "log": log}
        finally:
            server.stop()


@pytest.fixture
def client(env) -> ollama.Client:
    return ollama.Client(host=f"http://127.0.0.1:{env['port']}", trust_env=False)


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def _http(env, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{env['port']}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with _opener.open(req, timeout=30) as r:
            return r.status, r.headers, r.read()  # an email.message.Message: names are case-insensitive
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# ------------------------------------------------------------------------------------ with the ollama client


def test_list_and_show(env, client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert set(models) == {"tiny:latest", "sft:latest"}
    weights = env["root"] / "tiny" / "model.safetensors"
    tiny = models["tiny:latest"]
    assert tiny.size == weights.stat().st_size
    assert tiny.digest == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert tiny.details.format == "safetensors" and tiny.details.family == "gpt2"
    assert tiny.details.parameter_size == "3.3M" and tiny.details.quantization_level == "F32"

    shown = client.show("tiny")
    assert shown.modelinfo["general.architecture"] == "gpt2"
    assert shown.modelinfo["gpt2.context_length"] == 128
    assert shown.modelinfo["general.parameter_count"] == env["plain"].num_params()
    assert shown.details.family == "gpt2" and "num_ctx" in shown.parameters
    assert "### Instruction:" in client.show("sft").template
    with pytest.raises(ollama.ResponseError) as err:
        client.show("missing")
    assert err.value.status_code == 404 and "missing" in err.value.error


def test_generate_stream_and_non_stream_agree_with_the_library(env, client: ollama.Client) -> None:
    prompt = "Every effort moves you"
    whole = client.generate("tiny", prompt, options=GREEDY)
    expected = decode(generate(env["plain"], [encode(prompt)], max_new_tokens=20, eos_id=EOT_ID)[0])
    assert whole.response == expected and whole.done and whole.done_reason == "length"
    assert whole.eval_count == 20 and whole.prompt_eval_count == len(encode(prompt))
    assert whole.context == encode(prompt) + encode(expected)

    chunks = list(client.generate("tiny", prompt, options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done and chunks[-1].response == ""
    assert "".join(c.response for c in chunks) == whole.response
    assert chunks[-1].eval_count == 20 and chunks[-1].done_reason == "length"


def test_num_predict_limits_eval_count(client: ollama.Client) -> None:
    r = client.generate("tiny", "Hello", options={"temperature": 0, "num_predict": 3})
    assert r.eval_count == 3 and r.done_reason == "length"
    r = client.generate("tiny", "Hello", options={"temperature": 0, "num_predict": 0})
    assert r.eval_count == 0 and r.response == ""
    # -1: until the 128-token context window is full.
    r = client.generate("tiny", "Hello", options={"temperature": 0, "num_predict": -1})
    assert r.eval_count == 128 - len(encode("Hello"))


def test_sampling_is_seeded_per_request(client: ollama.Client) -> None:
    # The random init gives nearly flat logits, so two seeds agreeing on 16 tokens is (practically) impossible.
    def sample(seed: int, stream: bool = False) -> str:
        options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": seed, "num_predict": 16}
        if stream:
            return "".join(
                c.response for c in client.generate("tiny", "Once upon", options=options, stream=True)
            )
        return client.generate("tiny", "Once upon", options=options).response

    first = sample(7)
    assert sample(7) == first == sample(7, stream=True)
    assert sample(8) != first
    greedy = client.generate("tiny", "Once upon", options=GREEDY).response
    assert client.generate("tiny", "Once upon", options={**GREEDY, "seed": 99}).response == greedy


def test_stop_strings(client: ollama.Client) -> None:
    # Seeded sampling: varied text (greedy decoding of a random model repeats one token), still reproducible.
    prompt, sampled = "The meaning of life is", {"temperature": 1.0, "seed": 3, "num_predict": 40}
    full = client.generate("tiny", prompt, options=sampled).response
    middle = len(full) // 2
    stop = full[middle : middle + 5]  # almost surely spans a token boundary
    expected = full[: full.find(stop)]
    assert len(expected) > 10
    options = {**sampled, "stop": [stop]}
    r = client.generate("tiny", prompt, options=options)
    assert r.response == expected and r.done_reason == "stop"
    streamed = list(client.generate("tiny", prompt, options=options, stream=True))
    assert "".join(c.response for c in streamed) == expected and streamed[-1].done_reason == "stop"


def test_chat_stream_and_non_stream(client: ollama.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    whole = client.chat("tiny", messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.done
    assert whole.prompt_eval_count == len(encode("system: Be brief.\nuser: Hi there\nassistant:"))
    chunks = list(client.chat("tiny", messages, options=GREEDY, stream=True))
    assert all(c.message.role == "assistant" for c in chunks) and chunks[-1].done
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert chunks[-1].eval_count == whole.eval_count


def test_alpaca_model_uses_the_template(client: ollama.Client) -> None:
    instruction = "Name a color."
    r = client.generate("sft", instruction, options=GREEDY)
    rendered = format_input({"instruction": instruction, "input": ""}) + format_response("")
    assert r.prompt_eval_count == len(encode(rendered))
    assert not r.response.startswith((" ", "\n"))  # leading whitespace is stripped, as the book does
    raw = client.generate("sft", instruction, raw=True, options=GREEDY)
    assert raw.prompt_eval_count == len(encode(instruction))
    chat = client.chat("sft:latest", [{"role": "user", "content": instruction}], options=GREEDY)
    assert chat.message.content == r.response  # same prompt, same greedy text


def test_unknown_model_is_404(client: ollama.Client) -> None:
    for call in (
        lambda: client.generate("nope", "hi"),
        lambda: client.chat("nope", [{"role": "user", "content": "hi"}]),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and err.value.error == "model 'nope' not found"


def test_empty_prompt_is_a_load_request(client: ollama.Client) -> None:
    r = client.generate("tiny")
    assert r.done and r.done_reason == "load" and r.response == ""
    assert client.chat("tiny", []).done_reason == "load"


# -------------------------------------------------------------------------------------------- plain HTTP


def test_http_generate_non_streaming_and_ndjson(env) -> None:
    body = {"model": "tiny", "prompt": "Hello", "stream": False, "options": GREEDY}
    status, headers, data = _http(env, "POST", "/api/generate", body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    whole = json.loads(data)
    for key in ("model", "created_at", "response", "done", "done_reason", "total_duration", "load_duration"):
        assert key in whole
    for key in ("prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"):
        assert isinstance(whole[key], int)

    status, headers, data = _http(env, "POST", "/api/generate", {**body, "stream": True})
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(x["response"] for x in lines) == whole["response"]
    assert lines[-1]["eval_count"] == whole["eval_count"] == 20


def test_name_and_name_latest_are_the_same_model(env) -> None:
    outs = []
    for name in ("tiny", "tiny:latest"):
        status, _, data = _http(
            env, "POST", "/api/generate", {"model": name, "prompt": "Hi", "stream": False, "options": GREEDY}
        )
        assert status == 200 and json.loads(data)["model"] == name  # echoed as asked, like Ollama
        outs.append(json.loads(data)["response"])
    assert outs[0] == outs[1]
    assert _http(env, "POST", "/api/generate", {"model": "tiny:v2", "prompt": "Hi"})[0] == 404


@pytest.mark.parametrize(
    ("path", "body", "raw", "status", "needle"),
    [
        ("/api/generate", None, b"{not json", 400, "invalid JSON"),
        ("/api/generate", None, b"", 400, "missing request body"),
        ("/api/generate", [1, 2], None, 400, "JSON object"),
        ("/api/generate", {"prompt": "hi"}, None, 400, "'model' is required"),
        ("/api/generate", {"model": 3, "prompt": "hi"}, None, 400, "must be a string"),
        ("/api/generate", {"model": "tiny", "prompt": "hi", "stream": "yes"}, None, 400, "boolean"),
        (
            "/api/generate",
            {"model": "tiny", "prompt": "hi", "options": {"temperature": "hot"}},
            None,
            400,
            "number",
        ),
        ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"top_p": 0}}, None, 400, "top_p"),
        (
            "/api/generate",
            {"model": "tiny", "prompt": "hi", "options": {"num_predict": -5}},
            None,
            400,
            "num_predict",
        ),
        ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"stop": [1]}}, None, 400, "stop"),
        ("/api/generate", {"model": "tiny", "prompt": "hi", "context": [-1]}, None, 400, "context"),
        ("/api/generate", {"model": "nope", "prompt": "hi"}, None, 404, "model 'nope' not found"),
        ("/api/chat", {"model": "tiny", "messages": "hi"}, None, 400, "must be a list"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "king", "content": "x"}]}, None, 400, "role"),
        (
            "/api/chat",
            {"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]},
            None,
            400,
            "'user'",
        ),
        (
            "/api/chat",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
            None,
            400,
            "tools",
        ),
        ("/api/show", {}, None, 400, "'name' is required"),
        ("/api/nothing", {}, None, 404, "no such endpoint"),
        ("/api/pull", {"model": "x"}, None, 501, "does not implement"),
    ],
)
def test_http_errors(env, path: str, body: Any, raw: bytes | None, status: int, needle: str) -> None:
    got, _, data = _http(env, "POST", path, body, raw)
    assert got == status
    assert needle in json.loads(data)["error"]


def test_wrong_method_is_405_and_head_works(env) -> None:
    status, headers, data = _http(env, "GET", "/api/generate")
    assert status == 405 and headers["Allow"] == "POST" and "not allowed" in json.loads(data)["error"]
    assert _http(env, "POST", "/api/tags", {})[0] == 405
    status, _, data = _http(env, "HEAD", "/")
    assert status == 200 and data == b""
    assert _http(env, "GET", "/")[2] == b"Ollama is running"
    assert json.loads(_http(env, "GET", "/api/version")[2])["version"].startswith("gptlab-")
    assert {m["name"] for m in json.loads(_http(env, "GET", "/api/ps")[2])["models"]} == {
        "tiny:latest",
        "sft:latest",
    }


def test_openai_chat_completions(env) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12}
    status, _, data = _http(env, "POST", "/v1/chat/completions", body)
    assert status == 200
    r = json.loads(data)
    assert r["object"] == "chat.completion" and r["model"] == "tiny" and r["id"].startswith("chatcmpl-")
    choice = r["choices"][0]
    assert (
        choice["index"] == 0
        and choice["message"]["role"] == "assistant"
        and choice["finish_reason"] == "length"
    )
    assert r["usage"]["completion_tokens"] == 12
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 12
    # Same rendering and decoding as /api/chat.
    ollama_body = {
        "model": "tiny",
        "messages": messages,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 12},
    }
    assert (
        json.loads(_http(env, "POST", "/api/chat", ollama_body)[2])["message"]["content"]
        == choice["message"]["content"]
    )

    status, headers, data = _http(
        env,
        "POST",
        "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = [e.removeprefix("data: ") for e in data.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert (
        chunks[-2]["choices"][0]["finish_reason"] == "length"
        and chunks[-1]["usage"]["completion_tokens"] == 12
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == choice["message"]["content"]

    status, _, data = _http(env, "POST", "/v1/chat/completions", {**body, "model": "nope"})
    assert status == 404 and json.loads(data)["error"]["message"] == "model 'nope' not found"
    assert [m["id"] for m in json.loads(_http(env, "GET", "/v1/models")[2])["data"]] == [
        "tiny:latest",
        "sft:latest",
    ]


def test_concurrent_requests_match_sequential(env) -> None:
    prompts = [f"Prompt number {i} says" for i in range(6)]

    def ask(prompt: str) -> str:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "stream": True,
            "options": {"temperature": 0, "num_predict": 24},
        }
        status, _, data = _http(env, "POST", "/api/generate", body)
        assert status == 200
        return "".join(json.loads(line)["response"] for line in data.decode().splitlines())

    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == sequential
    assert len(set(sequential)) > 1


def test_client_disconnect_mid_stream_keeps_the_server_up(env, client: ollama.Client) -> None:
    body = json.dumps({"model": "tiny", "prompt": "Go", "options": {"num_predict": -1}}).encode()
    with socket.create_connection(("127.0.0.1", env["port"]), timeout=10) as s:
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
        s.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(64).startswith(b"HTTP/1.1 200")
    assert client.generate("tiny", "Hello", options={"num_predict": 2}).eval_count == 2


def test_a_client_that_disconnects_stops_its_decoding(env) -> None:
    server = make_server({"tiny": env["root"] / "tiny"}, log=io.StringIO()).start()
    served = server.models["tiny:latest"]
    try:
        served.lock.acquire()  # the generation cannot advance until the client is gone
        body = json.dumps({"model": "tiny", "prompt": "Go", "options": {"num_predict": -1}}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            assert s.recv(15) == b"HTTP/1.1 200 OK"
        time.sleep(0.2)
        served.lock.release()
        log = server.app.state.log
        deadline = time.monotonic() + 10
        while "(client disconnected)" not in log.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert re.search(r"POST /api/generate 200 \d+\.\d{3}s \(client disconnected\)", log.getvalue())
    finally:
        server.stop()


def test_stop_ends_generations_and_connections(env) -> None:
    server = make_server({"tiny": env["root"] / "tiny"}, log=io.StringIO()).start()
    served = server.models["tiny:latest"]
    served.lock.acquire()  # hold the model so the request is surely mid-generation when the server stops
    body = json.dumps({"model": "tiny", "prompt": "Go", "options": {"num_predict": -1}}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        assert s.recv(15) == b"HTTP/1.1 200 OK"
        closer = threading.Thread(target=server.stop)
        closer.start()
        while not server.stopping.is_set():
            time.sleep(0.01)
        served.lock.release()
        closer.join(timeout=10)
        assert not closer.is_alive()
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    assert b'{"error": "the server is shutting down"}' in rest and rest.endswith(b"0\r\n\r\n")


def test_requests_are_logged(env) -> None:
    # A handler logs after its response is sent, so the line may land a moment after the client has it.
    assert _http(env, "GET", "/api/tags?probe=logged")[0] == 200
    deadline = time.monotonic() + 5
    while "GET /api/tags?probe=logged 200 " not in env["log"].getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    line = next(x for x in env["log"].getvalue().splitlines() if "probe=logged" in x)
    assert re.search(r"127\.0\.0\.1 GET /api/tags\?probe=logged 200 \d+\.\d{3}s$", line)


# ----------------------------------------------------------------------------------- prompts and decoding


def test_render_generate_prompt() -> None:
    alpaca = render_generate_prompt("Name a color.", prompt_format="alpaca")
    assert alpaca == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert render_generate_prompt("Name a color.", prompt_format="alpaca", raw=True) == "Name a color."
    with_system = render_generate_prompt("Name a color.", system="Answer in French.", prompt_format="alpaca")
    assert "### Instruction:\nAnswer in French.\n\nName a color.\n\n### Response:\n" in with_system
    assert render_generate_prompt("Once upon") == "Once upon"
    assert render_generate_prompt("Once upon", system="Fairy tales.") == "Fairy tales.\n\nOnce upon"


def test_render_chat_prompt() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert render_chat_prompt(messages, prompt_format="alpaca") == format_input(
        {"instruction": "Be brief.\n\nAnd 3+3?", "input": "User: What is 2+2?\nAssistant: 4"}
    ) + format_response("")
    assert (
        render_chat_prompt(messages)
        == "system: Be brief.\nuser: What is 2+2?\nassistant: 4\nuser: And 3+3?\nassistant:"
    )
    single = render_chat_prompt([{"role": "user", "content": "Hi"}], prompt_format="alpaca")
    assert single == render_generate_prompt("Hi", prompt_format="alpaca")
    with pytest.raises(ValueError, match="'user'"):
        render_chat_prompt(messages[:3])


def _pieces(text_filter: TextFilter, ids: list[int]) -> tuple[list[str], bool]:
    pieces = []
    for token in ids:
        piece, stopped = text_filter.push(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    piece, stopped = text_filter.finish()
    return [*pieces, piece], stopped


def test_text_filter_holds_back_incomplete_utf8(gpt2_tiktoken_file: Path) -> None:
    enc = GPT2Tokenizer().decode
    text = "héllo 世界 🙂 done"
    ids = encode(text)
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens
    pieces, stopped = _pieces(TextFilter(enc), ids)
    assert not stopped and "".join(pieces) == text == decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # a token ending mid-character produced nothing yet
    # A dangling partial character is flushed as U+FFFD at the end, as tiktoken's decode does.
    partial = encode("🙂")[:1]
    assert "".join(_pieces(TextFilter(enc), partial)[0]) == decode(partial)


def test_text_filter_stop_strings_and_alpaca_header(gpt2_tiktoken_file: Path) -> None:
    enc = GPT2Tokenizer().decode
    pieces, stopped = _pieces(TextFilter(enc, ["STOP here"]), encode("one two STOP here three"))
    assert stopped and "".join(pieces) == "one two "
    assert all("STOP" not in p for p in pieces)  # a possible stop prefix is never emitted early
    pieces, stopped = _pieces(TextFilter(enc, ["STOP here"]), encode("one STOP there"))
    assert not stopped and "".join(pieces) == "one STOP there"  # held-back text is released at the end
    f = TextFilter(enc, strip_leading=True, header="### Response:")
    assert "".join(_pieces(f, encode("\n### Response:\n  Blue.\n"))[0]) == "Blue.\n"
    f = TextFilter(enc, strip_leading=True, header="### Response:")
    assert "".join(_pieces(f, encode(" ### Resp"))[0]) == "### Resp"
    # Plain chat: stop strings see the text before leading whitespace is dropped.
    chat_stops = ["\nuser:", "\nassistant:", "\nsystem:"]
    pieces, stopped = _pieces(TextFilter(enc, chat_stops, strip_leading=True), encode("\nuser: hi"))
    assert stopped and "".join(pieces) == ""
    pieces, stopped = _pieces(TextFilter(enc, chat_stops, strip_leading=True), encode("  Hello!\nuser: hi"))
    assert stopped and "".join(pieces) == "Hello!"


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("spec", ["noequals", "=models/sft", "sft=", "bad name=dir", ":tag=dir"])
def test_parse_model_arg_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="--model"):
        parse_model_arg(spec)


def test_parse_model_arg() -> None:
    assert parse_model_arg("sft=models/sft") == ("sft", Path("models/sft"))
    assert parse_model_arg("me/gpt2:124m=a=b") == ("me/gpt2:124m", Path("a=b"))


def test_cli_serve_bad_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["serve", "--model", f"sft={missing}", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and err.startswith("gptlab serve: error:")

    classifier = GPT(GPTConfig.from_name("gpt-micro", n_layer=1, num_classes=2))
    save_checkpoint(classifier, tmp_path / "cls")
    assert main(["serve", "--model", f"cls={tmp_path / 'cls'}", "--port", "0"]) == 2
    assert "classifier" in capsys.readouterr().err

    assert main(["serve", "--model", "bad syntax", "--port", "0"]) == 2
    assert "NAME=CHECKPOINT_DIR" in capsys.readouterr().err


def test_cli_serve_prints_url_and_stops_on_ctrl_c(
    env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(self: Server) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Server, "run", interrupted)
    assert main(["serve", "--model", f"tiny={env['root'] / 'tiny'}", "--port", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "http://127.0.0.1:" in out and "tiny:latest" in out and "stopped" in err


def test_a_chat_template_model_answers_in_its_template(tmp_path: Path) -> None:
    """A Llama-family checkpoint with its own tokenizer and ChatML template: /api/chat renders the conversation
    with the template and stops at its end of turn, as gptlab's own generate does with the same ids."""
    from stage_fixtures import tiny_chat_checkpoint

    from gptlab.load import load_checkpoint, load_tokenizer

    path = tiny_chat_checkpoint(tmp_path / "chat")
    model, _ = load_checkpoint(path)
    tokenizer = load_tokenizer(path)
    messages = [{"role": "user", "content": "the cat"}]
    ids = tokenizer.encode_chat(messages)
    want = generate(model, [ids], max_new_tokens=12, eos_id=tokenizer.stop_ids)[0]
    server = make_server({"chat": path}).start()
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{server.port}", trust_env=False)
        reply = client.chat(model="chat", messages=messages, options={"temperature": 0, "num_predict": 12})
        assert reply.message.content == tokenizer.decode(want)
        assert reply.prompt_eval_count == len(ids) and reply.eval_count == len(want)
        shown = client.show("chat")
        assert shown.details.family == "llama" and "<|im_start|>" in shown.template
    finally:
        server.stop()
