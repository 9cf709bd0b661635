"""LLM-as-a-judge (book ch. 7.8) against a fake Ollama server on 127.0.0.1.

The fake speaks just enough of Ollama's HTTP API for the official client: ``GET /api/tags`` and non-streaming
``POST /api/generate``. Replies are scripted per request (500 / 404 / stall / a given text) or looked up by a
substring of the prompt; it records every request body and the most requests it ever had in flight at once.
No timing is asserted anywhere: concurrency is shown by overlapping requests, not by wall-clock time.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stages.judge import (
    SCORE_SCHEMA,
    JudgeConfig,
    JudgeUnavailableError,
    JudgmentCache,
    check_judge,
    judge_identity,
    judge_prompt,
    score_responses,
)
from stages.scores import summarize_scores

# --- fake Ollama --------------------------------------------------------------------------------------------


@dataclass
class FakeOllama:
    port: int = 0
    models: list[str] = field(default_factory=lambda: ["llama3:latest", "mistral:7b"])
    digest: str = "d"  # what /api/tags lists as every model's digest
    # Consumed one per /api/generate request: "500", "400", "404", "stall" (sleep stall_s, then answer normally),
    # or any other string = the reply text. Once empty, replies come from `replies`.
    script: list[str] = field(default_factory=list)
    # First key that is a substring of the prompt picks the reply; otherwise default_reply.
    replies: dict[str, str] = field(default_factory=dict)
    default_reply: str = '{"score": 50}'
    fail_all: bool = False  # every generate request gets a 500
    stall_s: float = 1.0
    # Prompts containing one of these keys sleep this long first (to make one item finish last).
    delays: dict[str, float] = field(default_factory=dict)
    # When > 1, each request waits (up to 2 s) until this many requests have been in flight together once.
    overlap: int = 0
    requests: list[dict] = field(default_factory=list)
    tags_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reply_for(self, prompt: str) -> str:
        return next((text for key, text in self.replies.items() if key in prompt), self.default_reply)


def _handler(state: FakeOllama) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real server

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path != "/api/tags":
                self._send(404, {"error": "not found"})
                return
            with state.cond:
                state.tags_requests += 1
            models = [
                {
                    "name": m,
                    "model": m,
                    "modified_at": "2024-05-01T00:00:00Z",
                    "size": 1,
                    "digest": state.digest,
                }
                for m in state.models
            ]
            self._send(200, {"models": models})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/api/generate":
                self._send(404, {"error": "not found"})
                return
            with state.cond:
                state.requests.append(body)
                action = state.script.pop(0) if state.script else None
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                state.cond.notify_all()
                if state.overlap > 1:
                    state.cond.wait_for(lambda: state.max_in_flight >= state.overlap, timeout=2.0)
            try:
                prompt = body.get("prompt", "")
                for key, seconds in state.delays.items():
                    if key in prompt:
                        time.sleep(seconds)
                if state.fail_all or action == "500":
                    self._send(500, {"error": "llama runner process has terminated"})
                elif action == "400":
                    self._send(400, {"error": 'invalid format: expected "json" or a JSON schema'})
                elif action == "404":
                    self._send(404, {"error": f"model '{body['model']}' not found"})
                else:
                    if action == "stall":
                        time.sleep(state.stall_s)
                    text = state.reply_for(prompt) if action in (None, "stall") else action
                    self._send(
                        200,
                        {
                            "model": body["model"],
                            "created_at": "2024-05-01T00:00:00Z",
                            "response": text,
                            "done": True,
                        },
                    )
            finally:
                with state.cond:
                    state.in_flight -= 1

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and hung up makes the stalled handler's write fail; that's expected


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    state = FakeOllama()
    server = _Server(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx honours proxy variables; the fake server must be reached directly.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg_for(fake: FakeOllama, **overrides: object) -> JudgeConfig:
    settings: dict = {"host": fake.host, "timeout": 5.0, "backoff": 0.0, "concurrency": 2}
    settings.update(overrides)
    return JudgeConfig(**settings)


ENTRY = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "The car is as fast as lightning.",
}


def items(n: int) -> list[tuple[dict, str]]:
    return [
        ({"instruction": f"Task number {i}.", "input": "", "output": f"answer {i}"}, f"response {i}")
        for i in range(n)
    ]


# --- judge_prompt -------------------------------------------------------------------------------------------


def test_judge_prompt_is_the_books_text():
    assert judge_prompt(ENTRY, "The car is as fast as a cheetah.") == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
        "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model response "
        "`The car is as fast as a cheetah.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def test_judge_prompt_without_input():
    entry = {"instruction": "Name the capital of France.", "input": "", "output": "Paris."}
    prompt = judge_prompt(entry, "Paris")
    assert "### Input" not in prompt
    assert prompt.startswith("Given the input `Below is an instruction")
    assert (
        "Name the capital of France.` and correct output `Paris.`, score the model response `Paris` on"
        in prompt
    )


# --- parse_score --------------------------------------------------------------------------------------------


# --- JudgmentCache ------------------------------------------------------------------------------------------


def test_cache_roundtrip_and_survives_a_new_instance(tmp_path: Path):
    path = tmp_path / "sub" / "judgments.jsonl"
    cache = JudgmentCache(path)
    assert cache.get("llama3", "p") is None
    cache.put("llama3", "p", {"score": 85, "reply": '{"score": 85}', "attempts": 1})
    cache.put("llama3", "q", {"score": None, "reply": "eighty"})
    assert cache.get("llama3", "p") == {"score": 85, "reply": '{"score": 85}'}
    assert cache.get("mistral", "p") is None  # the judge model is part of the key

    again = JudgmentCache(path)
    assert len(again) == 2
    assert again.get("llama3", "p") == {"score": 85, "reply": '{"score": 85}'}
    assert again.get("llama3", "q") == {"score": None, "reply": "eighty"}
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["prompt"] == "p"


def test_cache_last_write_wins(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    JudgmentCache(path).put("m", "p", {"score": 1, "reply": "1"})
    JudgmentCache(path).put("m", "p", {"score": 2, "reply": "2"})
    assert JudgmentCache(path).get("m", "p") == {"score": 2, "reply": "2"}


def test_cache_truncated_last_line_is_dropped_with_a_warning(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    JudgmentCache(path).put("m", "p", {"score": 70, "reply": "70"})
    with open(path, "a") as f:
        f.write('{"key": "abc", "model": "m", "prom')  # a run killed mid-write
    with pytest.warns(RuntimeWarning, match="line 2 is truncated"):
        cache = JudgmentCache(path)
    assert cache.get("m", "p") == {"score": 70, "reply": "70"}
    cache.put("m", "q", {"score": 90, "reply": "90"})
    # The torn line is gone, so the new record is on its own line and reopening is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = JudgmentCache(path)
    assert reopened.get("m", "q") == {"score": 90, "reply": "90"}
    assert len(path.read_text().splitlines()) == 2


def test_cache_corrupt_inner_line_is_skipped_with_a_warning(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    JudgmentCache(path).put("m", "p", {"score": 70, "reply": "70"})
    with open(path, "a") as f:
        f.write("not json\n")
    with pytest.warns(RuntimeWarning, match="skipping unreadable line 2"):
        cache = JudgmentCache(path)
    cache.put("m", "q", {"score": 80, "reply": "80"})
    with pytest.warns(RuntimeWarning, match="line 2"):
        reopened = JudgmentCache(path)
    assert reopened.get("m", "p")["score"] == 70 and reopened.get("m", "q")["score"] == 80


def test_cache_complete_last_line_without_newline_is_kept(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    JudgmentCache(path).put("m", "p", {"score": 70, "reply": "70"})
    path.write_text(path.read_text().rstrip("\n"))
    cache = JudgmentCache(path)
    cache.put("m", "q", {"score": 80, "reply": "80"})
    reopened = JudgmentCache(path)
    assert reopened.get("m", "p")["score"] == 70 and reopened.get("m", "q")["score"] == 80


def test_cache_is_thread_safe(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    cache = JudgmentCache(path)

    def write(t: int) -> None:
        for i in range(50):
            cache.put("m", f"{t}-{i}", {"score": i, "reply": "x" * 500})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = JudgmentCache(path)
    assert len(reopened) == 400 and reopened.get("m", "7-49")["score"] == 49


def test_cache_put_rejects_bad_records(tmp_path: Path):
    cache = JudgmentCache(tmp_path / "j.jsonl")
    with pytest.raises(TypeError):
        cache.put("m", "p", {"score": "85", "reply": "85"})
    with pytest.raises(KeyError):
        cache.put("m", "p", {"score": 85})


# --- check_judge --------------------------------------------------------------------------------------------


def test_check_judge_accepts_a_model_with_or_without_latest(fake: FakeOllama):
    check_judge(cfg_for(fake, model="llama3"))
    check_judge(cfg_for(fake, model="llama3:latest"))
    check_judge(cfg_for(fake, model="mistral:7b"))
    assert fake.tags_requests == 3


def test_check_judge_missing_model_names_ollama_pull(fake: FakeOllama):
    with pytest.raises(JudgeUnavailableError) as info:
        check_judge(cfg_for(fake, model="llama3.1:8b"))
    message = str(info.value)
    assert message == f"model llama3.1:8b not available at {fake.host}; run `ollama pull llama3.1:8b`"


def test_check_judge_unreachable_host_is_one_line_naming_host_and_ollama_serve():
    host = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(JudgeUnavailableError) as info:
        check_judge(JudgeConfig(host=host))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"judge at {host} is unreachable: ")
    assert "`ollama serve`" in message and "`ollama pull llama3`" in message


# --- score_responses ----------------------------------------------------------------------------------------


def test_request_carries_schema_temperature_seed_and_the_books_prompt(fake: FakeOllama, tmp_path: Path):
    fake.default_reply = '{"score": 85}'
    cache = JudgmentCache(tmp_path / "j.jsonl")
    [result] = score_responses(
        [(ENTRY, "The car is as fast as a cheetah.")], cfg_for(fake), cache, progress=False
    )
    assert result == {"score": 85, "reply": '{"score": 85}', "cached": False, "attempts": 1}
    [request] = fake.requests
    assert request["model"] == "llama3"
    assert request["prompt"] == judge_prompt(ENTRY, "The car is as fast as a cheetah.")
    assert request["format"] == SCORE_SCHEMA
    assert request["options"] == {"temperature": 0.0, "seed": 123, "num_ctx": 2048}  # the book's query_model
    assert request["stream"] is False


def test_without_schema_the_request_has_no_format(fake: FakeOllama, tmp_path: Path):
    fake.default_reply = "85"
    cache = JudgmentCache(tmp_path / "j.jsonl")
    [result] = score_responses(items(1), cfg_for(fake, use_schema=False), cache, progress=False)
    assert result["score"] == 85
    assert "format" not in fake.requests[0]


def test_rerun_is_served_from_the_cache_without_requests(fake: FakeOllama, tmp_path: Path):
    fake.replies = {f"response {i}`": f'{{"score": {10 * i}}}' for i in range(5)}
    path = tmp_path / "j.jsonl"
    first = score_responses(items(5), cfg_for(fake), JudgmentCache(path), progress=False)
    assert [r["score"] for r in first] == [0, 10, 20, 30, 40]
    assert len(fake.requests) == 5

    # Same instance, then a fresh instance on the same file (a restart): no new requests either way.
    cache = JudgmentCache(path)
    again = score_responses(items(5), cfg_for(fake), cache, progress=False)
    assert len(fake.requests) == 5
    assert [r["score"] for r in again] == [0, 10, 20, 30, 40]
    assert all(r["cached"] and r["attempts"] == 0 for r in again)
    assert [r["reply"] for r in again] == [r["reply"] for r in first]

    # A sixth item is the only one asked.
    more = score_responses(items(6), cfg_for(fake), cache, progress=False)
    assert len(fake.requests) == 6
    assert [r["cached"] for r in more] == [True] * 5 + [False]


def test_another_judge_model_is_not_a_cache_hit(fake: FakeOllama, tmp_path: Path):
    cache = JudgmentCache(tmp_path / "j.jsonl")
    score_responses(items(2), cfg_for(fake), cache, progress=False)
    score_responses(items(2), cfg_for(fake, model="mistral:7b"), cache, progress=False)
    assert [r["model"] for r in fake.requests] == ["llama3", "llama3", "mistral:7b", "mistral:7b"]


def test_duplicate_items_are_asked_once(fake: FakeOllama, tmp_path: Path):
    pair = items(1)[0]
    results = score_responses(
        [pair, pair, pair], cfg_for(fake), JudgmentCache(tmp_path / "j.jsonl"), progress=False
    )
    assert len(fake.requests) == 1
    assert [r["cached"] for r in results] == [False, True, True]
    assert [r["score"] for r in results] == [50, 50, 50]


def test_unparsed_twice_is_recorded_as_none_after_one_retry_without_schema(fake: FakeOllama, tmp_path: Path):
    fake.default_reply = "eighty"
    path = tmp_path / "j.jsonl"
    [result] = score_responses(items(1), cfg_for(fake), JudgmentCache(path), progress=False)
    assert result == {"score": None, "reply": "eighty", "cached": False, "attempts": 2}
    # The re-ask flips the format: the schema first, then the book's plain-text request.
    assert [r.get("format") for r in fake.requests] == [SCORE_SCHEMA, None]
    assert summarize_scores([result["score"]])["unparsed"] == 1
    # The unparsed answer is cached too: a rerun does not ask again.
    [again] = score_responses(items(1), cfg_for(fake), JudgmentCache(path), progress=False)
    assert again["score"] is None and again["cached"] and len(fake.requests) == 2


def test_unparsed_then_parsed_on_the_retry(fake: FakeOllama, tmp_path: Path):
    fake.script = ['{"score": 150}', "85"]
    [result] = score_responses(items(1), cfg_for(fake), JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert result == {"score": 85, "reply": "85", "cached": False, "attempts": 2}


def test_plain_text_judge_retries_with_the_schema(fake: FakeOllama, tmp_path: Path):
    fake.script = ["I cannot score this", '{"score": 60}']
    cfg = cfg_for(fake, use_schema=False)
    [result] = score_responses(items(1), cfg, JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert result["score"] == 60
    assert [r.get("format") for r in fake.requests] == [None, SCORE_SCHEMA]


def test_schema_refused_on_the_reask_keeps_the_first_reply(fake: FakeOllama, tmp_path: Path):
    # use_schema=False on an old Ollama: the schema re-ask gets a 400; the plain reply stands, unparsed.
    fake.script = ["I cannot score this", "400"]
    cfg = cfg_for(fake, use_schema=False)
    [result] = score_responses(items(1), cfg, JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert result == {"score": None, "reply": "I cannot score this", "cached": False, "attempts": 2}


def test_schema_refused_up_front_is_an_error_with_a_hint(fake: FakeOllama, tmp_path: Path):
    fake.script = ["400"]
    with pytest.raises(JudgeUnavailableError, match="rejected the request.*set use_schema=False") as info:
        score_responses(items(1), cfg_for(fake), JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert "\n" not in str(info.value)
    assert len(fake.requests) == 1  # a 400 is not retried


def test_server_errors_are_retried_then_succeed(fake: FakeOllama, tmp_path: Path):
    fake.script = ["500", "500"]
    fake.default_reply = '{"score": 77}'
    cfg = cfg_for(fake, retries=3, concurrency=1)
    [result] = score_responses(items(1), cfg, JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert result == {"score": 77, "reply": '{"score": 77}', "cached": False, "attempts": 3}
    assert len(fake.requests) == 3


def test_timeouts_are_retried(fake: FakeOllama, tmp_path: Path):
    fake.script = ["stall"]
    fake.stall_s = 1.0
    fake.default_reply = '{"score": 64}'
    cfg = cfg_for(fake, timeout=0.2, concurrency=1)
    [result] = score_responses(items(1), cfg, JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert result["score"] == 64 and result["attempts"] == 2


def test_persistent_server_errors_raise_after_the_retries_and_keep_finished_work(
    fake: FakeOllama, tmp_path: Path
):
    path = tmp_path / "j.jsonl"
    fake.script = ['{"score": 90}'] + ["500"] * 6
    cfg = cfg_for(fake, retries=2, concurrency=1)
    with pytest.raises(JudgeUnavailableError) as info:
        score_responses(items(3), cfg, JudgmentCache(path), progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"judge at {fake.host} failed 3 times: ")
    assert "(status code: 500)" in message and "`ollama serve`" in message
    # Item 0 once, item 1 three times (1 + retries); item 2 may or may not have been picked up by the worker
    # before the failure cancelled the queue (if so, it failed three times as well).
    assert len(fake.requests) in (4, 7)
    # The finished item was cached: the resumed run asks only for the other two.
    fake.script = []
    before = len(fake.requests)
    results = score_responses(items(3), cfg, JudgmentCache(path), progress=False)
    assert [r["cached"] for r in results] == [True, False, False]
    assert [r["score"] for r in results] == [90, 50, 50]
    assert len(fake.requests) == before + 2


def test_unreachable_host_raises_one_line_naming_host_and_ollama_serve(tmp_path: Path):
    host = f"http://127.0.0.1:{closed_port()}"
    cfg = JudgeConfig(host=host, retries=1, backoff=0.0, timeout=5.0)
    with pytest.raises(JudgeUnavailableError) as info:
        score_responses(items(2), cfg, JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"judge at {host} failed 2 times: ")
    assert "`ollama serve`" in message
    assert not (tmp_path / "j.jsonl").exists()  # nothing was judged, nothing was cached


def test_model_not_found_names_ollama_pull(fake: FakeOllama, tmp_path: Path):
    fake.script = ["404"]
    with pytest.raises(
        JudgeUnavailableError, match=r"model llama3 not available at .*; run `ollama pull llama3`"
    ):
        score_responses(
            items(1), cfg_for(fake, concurrency=1), JudgmentCache(tmp_path / "j.jsonl"), progress=False
        )
    assert len(fake.requests) == 1  # a missing model is not retried


def test_requests_overlap_up_to_the_concurrency_and_results_keep_input_order(
    fake: FakeOllama, tmp_path: Path
):
    fake.overlap = 2  # each request waits until two have been in flight together (or gives up after 2 s)
    fake.replies = {f"response {i}`": f'{{"score": {i + 1}}}' for i in range(8)}
    fake.delays = {"response 0`": 0.3}  # the first item finishes last
    cfg = cfg_for(fake, concurrency=4)
    results = score_responses(items(8), cfg, JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert 1 < fake.max_in_flight <= 4
    assert [r["score"] for r in results] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["reply"] for r in results] == [f'{{"score": {i + 1}}}' for i in range(8)]
    assert len(fake.requests) == 8


def test_concurrency_one_is_serial(fake: FakeOllama, tmp_path: Path):
    cfg = cfg_for(fake, concurrency=1)
    score_responses(items(4), cfg, JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert fake.max_in_flight == 1 and len(fake.requests) == 4


def test_empty_input(fake: FakeOllama, tmp_path: Path):
    assert score_responses([], cfg_for(fake), JudgmentCache(tmp_path / "j.jsonl"), progress=False) == []
    assert fake.requests == []


def test_progress_bar_runs(fake: FakeOllama, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    score_responses(items(2), cfg_for(fake), JudgmentCache(tmp_path / "j.jsonl"), progress=True)
    assert "judge llama3" in capsys.readouterr().err


# --- JudgeConfig --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"concurrency": 0},
        {"concurrency": True},
        {"retries": -1},
        {"timeout": 0},
        {"backoff": -1},
        {"model": ""},
    ],
)
def test_config_rejects_nonsense(bad: dict):
    with pytest.raises(ValueError):
        JudgeConfig(**bad)


def test_config_defaults_are_the_books():
    cfg = JudgeConfig()
    assert (cfg.host, cfg.model, cfg.temperature, cfg.seed) == ("http://127.0.0.1:11434", "llama3", 0.0, 123)


# --- summaries ----------------------------------------------------------------------------------------------


# --- reproducibility: digest, options, repeats ---------------------------------------------------------------


def test_check_judge_returns_the_models_digest(fake: FakeOllama):
    fake.digest = "sha256:abc123"
    assert check_judge(JudgeConfig(host=fake.host, model="llama3")) == "sha256:abc123"


def test_a_new_judge_digest_or_option_invalidates_cached_answers(fake: FakeOllama, tmp_path: Path):
    cache = JudgmentCache(tmp_path / "j.jsonl")
    cfg = JudgeConfig(host=fake.host, model="llama3", concurrency=1)
    items = [(ENTRY, "a response")]
    score_responses(items, cfg, cache, digest="old", progress=False)
    score_responses(items, cfg, cache, digest="old", progress=False)
    assert len(fake.requests) == 1  # same judge, same question: cached
    [again] = score_responses(items, cfg, cache, digest="new", progress=False)
    assert len(fake.requests) == 2 and not again["cached"]  # re-pulled model: asked again
    score_responses(
        items, JudgeConfig(host=fake.host, model="llama3", num_ctx=4096), cache, digest="new", progress=False
    )
    assert len(fake.requests) == 3 and fake.requests[-1]["options"]["num_ctx"] == 4096
    score_responses(items, cfg, cache, digest="new", repeat=1, progress=False)
    assert len(fake.requests) == 4  # a repeat is asked, not read back from repeat 0


def test_judge_identity_names_everything_that_shapes_an_answer():
    identity = json.loads(judge_identity(JudgeConfig(model="llama3:8b"), "sha256:x", repeat=2))
    assert identity == {
        "model": "llama3:8b",
        "digest": "sha256:x",
        "options": {"temperature": 0.0, "seed": 123, "num_ctx": 2048},
        "schema": True,
        "repeat": 2,
    }


def test_repeats_and_num_ctx_are_validated():
    with pytest.raises(ValueError, match="repeats"):
        JudgeConfig(repeats=0)
    with pytest.raises(ValueError, match="num_ctx"):
        JudgeConfig(num_ctx=0)
