"""Stage ``evaluate``: judge paths (reachable through ``gptlab serve``, unreachable, required) and reference metrics."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gptlab.checkpoint import save_checkpoint
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.serve.app import make_server
from stages.evaluate import EvaluateParams, JudgeParams, evaluate, response_sets
from stages.judge import JudgeUnavailableError, JudgmentCache

REPO = Path(__file__).resolve().parents[1]


def _records():
    sft = [
        {
            "instruction": "Name a primary color.",
            "input": "",
            "output": "Red is a primary color.",
            "model_response": "Red is a primary color.",
        },
        {"instruction": "Add 2 and 3.", "input": "", "output": "5", "model_response": "The answer is 6."},
        {"instruction": "Antonym of hot?", "input": "hot", "output": "cold", "model_response": ""},
    ]
    dpo = [
        {
            "instruction": "Be polite.",
            "input": "",
            "output": "Thank you.",
            "reference_response": "Thanks!",
            "model_response": "Thank you.",
        },
        {
            "instruction": "Spell cat.",
            "input": "",
            "output": "c-a-t",
            "reference_response": "cat",
            "model_response": "dog",
        },
    ]
    return sft, dpo


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_judge_still_computes_reference_metrics(tmp_path) -> None:
    params = EvaluateParams(judge=JudgeParams(host=f"http://127.0.0.1:{_closed_port()}", required=False))
    metrics, table, _ = evaluate(response_sets(*_records()), params, tmp_path / "cache.jsonl")
    assert metrics["judge_status"] == "unreachable" and "sft_vs_dpo" not in metrics
    sft = metrics["models"]["sft"]
    assert sft["n"] == 3 and sft["exact_match"] == pytest.approx(1 / 3)
    assert sft["rouge_l_f1"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert "mean" not in sft  # never a fake score
    assert metrics["models"]["dpo"]["exact_match"] == pytest.approx(0.5)
    assert len(table) == 7 and table["score"].isna().all()


def test_nothing_to_score_is_not_a_crash(tmp_path) -> None:
    params = EvaluateParams(judge=JudgeParams(host=f"http://127.0.0.1:{_closed_port()}"), max_records=0)
    metrics, table, _ = evaluate(response_sets(*_records()), params, tmp_path / "cache.jsonl")
    assert table.empty and metrics["models"]["sft"]["n"] == 0


def test_required_judge_unreachable_is_an_error(tmp_path) -> None:
    params = EvaluateParams(judge=JudgeParams(host=f"http://127.0.0.1:{_closed_port()}", required=True))
    with pytest.raises(JudgeUnavailableError, match="unreachable.*ollama serve"):
        evaluate(response_sets(*_records()), params, tmp_path / "cache.jsonl")


def test_stage_cli_required_judge_one_line_exit_2(tmp_path) -> None:
    sft, dpo = _records()
    (tmp_path / "sft.json").write_text(json.dumps(sft))
    (tmp_path / "dpo.json").write_text(json.dumps(dpo))
    port = _closed_port()
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"evaluate": {"judge": {"host": f"http://127.0.0.1:{port}", "required": True}}})
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.evaluate",
            "--sft",
            "sft.json",
            "--dpo",
            "dpo.json",
            "--metrics",
            "m.json",
            "--table",
            "t.parquet",
            "--plot",
            "p.png",
            "--cache",
            "c.jsonl",
        ],
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"evaluate: error: judge at http://127.0.0.1:{port} is unreachable")
        and "ollama serve" in last
    )
    assert not (tmp_path / "m.json").exists()


@pytest.fixture
def judge_server(tmp_path):
    """`gptlab serve` on a free loopback port with a small random checkpoint as the "judge" model."""
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig.from_name("gpt-micro", n_layer=1)), tmp_path / "judge")
    log = io.StringIO()
    server = make_server({"judge": tmp_path / "judge"}, port=0, log=log).start()
    yield server.url, log
    server.stop()


def test_judge_through_gptlab_serve_with_cache(judge_server, tmp_path) -> None:
    host, log = judge_server
    # gptlab serve cannot constrain output to a JSON schema, so it is asked for plain text as the book does.
    params = EvaluateParams(
        judge=JudgeParams(host=host, model="judge", use_schema=False, timeout=60, concurrency=2)
    )
    sets = response_sets(*_records())
    metrics, table, _ = evaluate(sets, params, tmp_path / "cache.jsonl")
    assert metrics["judge_status"] == "ok" and metrics["judge_model"] == "judge"
    for name, expected in (("sft", 3), ("sft_on_preference", 2), ("dpo", 2)):
        m = metrics["models"][name]
        # A random model rarely answers with a number: whatever it says is scored or counted, never dropped.
        assert (
            m["n"] == m["answers"] == expected
            and m["scored"] + m["unparsed"] == expected
            and m["cached"] == 0
        )
    assert metrics["sft_vs_dpo"]["compared"] + metrics["sft_vs_dpo"]["skipped"] == 2
    assert len(table) == 7 and table["judge_reply"].notna().all()
    asked = log.getvalue().count("/api/generate")
    assert asked >= 7  # one request per record, plus one re-ask per unparsable reply
    assert len(JudgmentCache(tmp_path / "cache.jsonl")) == 7

    again, table2, _ = evaluate(sets, params, tmp_path / "cache.jsonl")
    assert log.getvalue().count("/api/generate") == asked  # the rerun asked nothing
    assert all(again["models"][n]["cached"] == again["models"][n]["n"] for n in again["models"])
    assert table2["score"].equals(table["score"])


def test_repeats_digest_and_options_are_recorded(judge_server, tmp_path) -> None:
    import hashlib

    host, log = judge_server
    params = EvaluateParams(
        judge=JudgeParams(host=host, model="judge", use_schema=False, timeout=60, repeats=2, temperature=0.0)
    )
    metrics, table, replies = evaluate(response_sets(*_records()), params, tmp_path / "cache.jsonl")
    weights = (tmp_path / "judge" / "model.safetensors").read_bytes()
    judge = metrics["judge"]
    # gptlab serve reports the sha256 of the checkpoint's weights: stable for a checkpoint, new when it changes.
    assert judge["digest"] == hashlib.sha256(weights).hexdigest()
    assert judge["options"] == {"temperature": 0.0, "seed": 123, "num_ctx": 2048} and judge["repeats"] == 2
    assert len(replies) == 2 * 7 and {r["repeat"] for r in replies} == {0, 1}
    for name, records in (("sft", 3), ("dpo", 2)):
        m = metrics["models"][name]
        assert len(m["repeat_means"]) == 2 and m["n"] == records and m["answers"] == 2 * records
        assert m["scored"] + m["unparsed"] == m["answers"]
    # Greedy decoding of a fixed checkpoint answers the same twice: the spread is measured, and it is zero.
    by_record = {}
    for r in replies:
        by_record.setdefault((r["set"], r["record"]), []).append(r["reply"])
    assert all(a == b for a, b in by_record.values())
    assert table["score_std"].dropna().eq(0).all()
    assert len(JudgmentCache(tmp_path / "cache.jsonl")) == 14
