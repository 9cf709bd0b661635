"""The evaluate stage's results as MLflow GenAI evaluations (MLflow 3, ``mlflow.genai.evaluate``).

One evaluation run per evaluated model, both over the same prompts — the DPO test split, where the records carry
the SFT model's answer (``reference_response``) beside the DPO model's (``model_response``) — so MLflow's UI lines
their rows up side by side. Each test instruction becomes a trace (inputs: instruction and input; outputs: the
model's answer; expectations: the reference answer) with assessments from three scorers:

* ``judge_score``: the Ollama judge's 0-100 score, asked through gptlab's own client and judgment cache
  (:func:`stages.judge.score_responses`: the book's prompt, fixed options, retries), with the judge's raw reply as
  the rationale and ``ollama:<model>@<digest>`` as its LLM-judge source; mean of ``judge.repeats`` asks. The
  stage scores every answer before the evaluations are logged, so the scorer reads the cache and sends no second
  request; on a rerun nothing is sent at all. An unparsable reply is an assessment error, not a score.
* ``rouge_l_f1`` and ``exact_match`` against the reference (:mod:`gptlab.textmetrics`), which need no judge.

Without a reachable judge the runs hold the reference scores only and say so (tag ``gptlab.judge_status`` and
the run's description).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from gptlab.textmetrics import exact_match, rouge_l_f1
from stages import run_context, tracking
from stages.entry import stage_log
from stages.judge import JudgeConfig, JudgmentCache, score_responses

mlflow = tracking.mlflow
LOG = stage_log("evaluate")

EVALUATED = {"sft": "sft_on_preference", "dpo": "dpo"}
"""Evaluation run -> the response set it holds (:func:`stages.evaluate.response_sets`): both on the DPO test
split's prompts."""


def rows(items: list[tuple[dict, str]]) -> list[dict]:
    """``mlflow.genai.evaluate``'s records for (test record, answer) pairs."""
    return [
        {
            # MLflow's Request column previews the first field: the instruction, which every record has.
            "inputs": {"instruction": entry["instruction"], "input": entry["input"]},
            "outputs": response,
            "expectations": {"expected_response": entry["output"]},
        }
        for entry, response in items
    ]


def _entry(inputs: dict, expectations: dict) -> dict:
    return {**inputs, "output": expectations["expected_response"]}


def reference_scorers() -> list:
    from mlflow.genai.scorers import scorer

    @scorer(name="rouge_l_f1")
    def rouge(outputs: str, expectations: dict) -> float:
        return rouge_l_f1(outputs, expectations["expected_response"])

    @scorer(name="exact_match")
    def exact(outputs: str, expectations: dict) -> float:
        return float(exact_match(outputs, expectations["expected_response"]))

    return [rouge, exact]


def judge_scorer(cfg: JudgeConfig, cache: JudgmentCache, digest: str | None) -> Callable:
    """A scorer asking the configured judge (cache first) for each row, ``cfg.repeats`` times."""
    from mlflow.entities import AssessmentError, AssessmentSource, Feedback
    from mlflow.genai.scorers import scorer

    source = AssessmentSource(source_type="LLM_JUDGE", source_id=f"ollama:{cfg.model}@{digest}")

    @scorer(name="judge_score")
    def judge(inputs: dict, outputs: str, expectations: dict) -> Feedback:
        item = [(_entry(inputs, expectations), outputs)]
        answers = [
            score_responses(item, cfg, cache, digest=digest, repeat=k, progress=False)[0]
            for k in range(cfg.repeats)
        ]
        scores = [a["score"] for a in answers if a["score"] is not None]
        rationale = "\n".join(str(a["reply"]) for a in answers)
        if not scores:
            error = AssessmentError(
                error_code="UNPARSED", error_message=f"no score in the judge's reply: {rationale}"
            )
            return Feedback(name="judge_score", error=error, rationale=rationale, source=source)
        return Feedback(
            name="judge_score", value=sum(scores) / len(scores), rationale=rationale, source=source
        )

    return judge


def log_evaluations(
    sets: dict[str, list[tuple[dict, str]]],
    cfg: JudgeConfig,
    cache_path: Path,
    *,
    status: str,
    digest: str | None,
    max_records: int | None = None,
) -> dict[str, dict]:
    """One nested MLflow run per evaluated model (in the active stage run), filled by ``mlflow.genai.evaluate``;
    returns {model: {"run_id", "traces", "metrics"}}."""
    # SQLite serialises writers: MLflow's default 10 threads mostly wait on its lock and drop traces.
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "1")
        os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS", "1")
    cache = JudgmentCache(cache_path)
    scorers = reference_scorers() + ([judge_scorer(cfg, cache, digest)] if status == "ok" else [])
    note = (
        f"Judge: {cfg.model} (digest {digest}) at {cfg.host}."
        if status == "ok"
        else f"No judge reachable at {cfg.host} ({cfg.model}): no judge scores, reference metrics only. "
        "Serve one with Ollama (or `gptlab serve`) and rerun the evaluate stage."
    )
    out = {}
    for model, set_name in EVALUATED.items():
        items = sets[set_name][:max_records] if max_records is not None else sets[set_name]
        tags = {
            **run_context.run_tags(),  # the pipeline run, Prefect flow run, profile and git source, as every run
            "gptlab.role": "evaluation",
            "gptlab.evaluated_model": model,
            "gptlab.judge_status": status,
            "gptlab.judge_model": cfg.model,
            "mlflow.note.content": f"{model.upper()} model's answers to the DPO test prompts. {note}",
        }
        # The harness prints a progress bar and a banner (the stage prints its own summary), and its dataset
        # digest calls pandas in a way pandas 4 will change.
        with (
            mlflow.start_run(run_name=f"evaluate-{model}", nested=True, tags=tags) as run,
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message="Starting with pandas version 4.0")
            result = mlflow.genai.evaluate(data=rows(items), scorers=scorers)
        traces = len(mlflow.search_traces(run_id=run.info.run_id, return_type="list"))
        if traces != len(items):
            LOG.warning(
                "evaluation run %s holds %d traces of %d answers", run.info.run_id, traces, len(items)
            )
        out[model] = {"run_id": run.info.run_id, "traces": traces, "metrics": dict(result.metrics)}
    return out
