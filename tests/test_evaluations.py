"""The evaluate stage's judgments as MLflow GenAI evaluations (stages/evaluations.py): a real ``mlflow server``,
``gptlab serve`` as the Ollama judge, MLflow's own client and REST API for what was recorded, and MLflow's UI in a
headless Chromium showing the two evaluation runs and their rows."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import background
import pytest
import torch
import yaml
from selenium.webdriver.common.by import By
from test_chat_ui import CHROMIUM, browser, wait_for  # noqa: F401 (browser is a fixture)

from gptlab.checkpoint import save_checkpoint
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.serve.app import make_server
from gptlab.textmetrics import rouge_l_f1
from gptlab.tokenizer import GPT2Tokenizer
from stages import tracking
from stages.evaluate import EvaluateParams, JudgeParams, evaluate, response_sets
from stages.evaluations import log_evaluations

DPO = [
    {"instruction": "Spell the word cat.", "input": "", "output": "c-a-t", "reference_response": "cat",
     "model_response": "c-a-t"},
    {"instruction": "Rewrite politely.", "input": "Give me water.", "output": "Could I have some water, please?",
     "reference_response": "Water now.", "model_response": "Could I have some water, please?"},
]  # fmt: skip
SFT = [{"instruction": "Name a primary color.", "input": "", "output": "Red.", "model_response": "Red."}]


def numeric_judge(path: Path, score: int = 85) -> Path:
    """A 1-layer GPT that answers every prompt with `` <score>`` and then its end-of-text token: a judge whose
    scores are known. Its block adds nothing and positions are zero, so each next token depends on the current
    one alone: after `` <score>`` comes end-of-text, after anything else `` <score>``."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt-micro", n_layer=1, tie_weights=False))
    (token,) = GPT2Tokenizer().encode(f" {score}")
    eot = GPT2Tokenizer.eos_id
    with torch.no_grad():
        for linear in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            linear.weight.zero_()
            linear.bias.zero_()
        model.transformer.wpe.weight.zero_()
        other, after = torch.randn(2, model.config.n_embd)
        model.transformer.wte.weight.copy_(other)  # every token alike...
        model.transformer.wte.weight[token] = after  # ...but the score
        norm = model.transformer.ln_f
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = norm(other)  # after any other token: the score
        model.lm_head.weight[eot] = norm(after)  # after the score: end of text
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The stage's scoring and evaluation logging against a served judge and a real MLflow server, once."""
    root = tmp_path_factory.mktemp("evaluations")
    (root / "params.yaml").write_text(yaml.safe_dump({"profile": "test"}))
    env = pytest.MonkeyPatch()
    env.chdir(root)
    log = io.StringIO()
    judge = make_server({"judge": numeric_judge(root / "judge")}, port=0, log=log).start()
    try:
        with background.mlflow_server(root) as url:
            env.setenv("MLFLOW_TRACKING_URI", url)
            env.setenv("GPTLAB_PIPELINE_RUN_ID", "run-evaluations-test")
            params = EvaluateParams(
                judge=JudgeParams(host=judge.url, model="judge", use_schema=False, timeout=60)
            )
            sets = response_sets(SFT, DPO)
            requests = []
            for _ in range(2):  # the second execution is a rerun: every judgment comes from the cache
                with tracking.stage_run("evaluate", params) as stage:
                    metrics, _, _ = evaluate(sets, params, root / "cache.jsonl")
                    before = log.getvalue().count("/api/generate")
                    runs = log_evaluations(
                        sets, params.judge_config(), root / "cache.jsonl", status="ok",
                        digest=metrics["judge"]["digest"],
                    )  # fmt: skip
                    requests.append((before, log.getvalue().count("/api/generate")))
            experiment = tracking.mlflow.get_experiment_by_name("gptlab").experiment_id
            yield {
                "url": url,
                "experiment": experiment,
                "runs": runs,
                "stage": stage.info.run_id,
                "metrics": metrics,
                "requests": requests,
            }
    finally:
        judge.stop()
        env.undo()


def test_each_model_is_an_evaluation_run_of_scored_traces(recorded) -> None:
    url, metrics = recorded["url"], recorded["metrics"]
    (first_before, first_after), (second_before, second_after) = recorded["requests"]
    # The scorer asks through the judgment cache the stage has just filled; a rerun sends nothing at all.
    assert first_before >= len(SFT) + 2 * len(DPO) and first_after == first_before
    assert second_after == second_before == first_before
    digest = metrics["judge"]["digest"]

    exp = background.mlflow_api(url, "experiments/search", {"max_results": 10, "filter": "name = 'gptlab'"})[
        "experiments"
    ][0]
    found = background.mlflow_api(
        url, "runs/search",
        {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`gptlab.role` = 'evaluation'", "max_results": 50},
    )["runs"]  # fmt: skip
    latest = {
        r["info"]["run_name"]: r
        for r in found
        if r["info"]["run_id"] in {v["run_id"] for v in recorded["runs"].values()}
    }
    assert sorted(latest) == ["evaluate-dpo", "evaluate-sft"]
    for name, run in latest.items():
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == recorded["stage"] and tags["gptlab.judge_status"] == "ok"
        assert f"digest {digest}" in tags["mlflow.note.content"]
        values = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert values["judge_score/mean"] == 85.0
        answers = "model_response" if name == "evaluate-dpo" else "reference_response"
        rouge = [rouge_l_f1(r[answers], r["output"]) for r in DPO]
        assert values["rouge_l_f1/mean"] == pytest.approx(sum(rouge) / len(rouge))

    tracking.mlflow.set_tracking_uri(url)
    for model, answers in (("sft", "reference_response"), ("dpo", "model_response")):
        traces = tracking.mlflow.search_traces(run_id=recorded["runs"][model]["run_id"], return_type="list")
        assert sorted(json.loads(t.data.response) for t in traces) == sorted(r[answers] for r in DPO)
        for t in traces:
            assert t.info.experiment_id == exp["experiment_id"]
            by_name = {a.name: a for a in t.info.assessments}
            judged = by_name["judge_score"]
            assert judged.value == 85.0 and "85" in judged.rationale
            assert (
                judged.source.source_type == "LLM_JUDGE"
                and judged.source.source_id == f"ollama:judge@{digest}"
            )
            assert by_name["expected_response"].value in {r["output"] for r in DPO}
            assert {"rouge_l_f1", "exact_match"} <= set(by_name)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: ./run.sh setup installs Debian's chromium")
def test_mlflow_ui_shows_both_evaluation_runs_and_their_rows(recorded, browser, tmp_path) -> None:  # noqa: F811
    url = recorded["url"]
    browser.set_window_size(1600, 1000)
    browser.get(f"{url}/#/experiments/{recorded['experiment']}/evaluation-runs")
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    wait_for("the evaluation runs", lambda: "evaluate-sft" in body() and "evaluate-dpo" in body(), timeout=60)
    assert "judge_score/mean" in body()
    browser.get(
        f"{url}/#/experiments/{recorded['experiment']}/runs/{recorded['runs']['dpo']['run_id']}/traces"
    )
    wait_for(
        "the evaluation's rows", lambda: body().count("c-a-t") >= 2 and "judge_score" in body(), timeout=60
    )
    assert "Could I have some water, please?" in body() and "85" in body()
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]")[:1]:
        close.click()  # the assistant's side panel
    # docs/evaluation-rows.png is this page: GPTLAB_SCREENSHOTS=docs remakes it.
    out = Path(os.environ.get("GPTLAB_SCREENSHOTS", tmp_path)) / "evaluation-rows.png"
    browser.save_screenshot(str(out))
    assert out.stat().st_size > 10_000
