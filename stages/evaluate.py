"""Stage ``evaluate``: score the SFT and DPO test-set responses with an LLM judge through Ollama (book ch. 7.8).

Each response is scored 0-100 by ``evaluate.judge.model`` at ``evaluate.judge.host`` with the book's prompt
(temperature 0, fixed seed, ``num_ctx`` 2048, a JSON-schema ``format``); unparsable replies are retried once and
then counted as unparsed, never dropped or invented. ``judge.repeats: N`` asks every question N times and
reports mean ± std per response and for each set. The judge's digest and every option sent are recorded with
the metrics, the raw replies logged to MLflow, and each model's answers become an MLflow GenAI evaluation run
(:mod:`stages.evaluations`: a trace per test instruction, the judge's score as an assessment). Answers are
cached by judge (model, digest, options, repeat) and prompt, so reruns ask nothing twice and a changed judge is
asked again.
Reference-based metrics (ROUGE-L F1, exact match) need no judge, and the DPO records, which carry the SFT
model's answer as ``reference_response``, give a pairwise SFT-vs-DPO comparison on the same prompts.

Judge unreachable: with ``judge.required: true`` a one-line error; otherwise ``judge_status: unreachable`` and
only the reference metrics.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gptlab.errors import UserError
from gptlab.fileio import atomic_write, read_utf8, write_json
from gptlab.textmetrics import exact_match, rouge_l_f1
from stages import tracking
from stages.entry import stage_log, stage_main
from stages.evaluations import log_evaluations
from stages.judge import (
    JudgeConfig,
    JudgeUnavailableError,
    JudgmentCache,
    check_judge,
    request_options,
    score_responses,
)
from stages.params import load_section
from stages.plots import figure
from stages.scores import compare_pairwise, summarize_repeats, summarize_scores

LOG = stage_log("evaluate")


@dataclass
class JudgeParams(JudgeConfig):
    required: bool = False
    """Fail the stage when the judge cannot be reached (otherwise record ``judge_status: unreachable``)."""


@dataclass
class EvaluateParams:
    judge: JudgeParams = field(default_factory=JudgeParams)
    max_records: int | None = None
    """Score at most this many records per response set (None: all)."""

    def judge_config(self) -> JudgeConfig:
        return JudgeConfig(**{k: v for k, v in vars(self.judge).items() if k != "required"})


def response_sets(sft: list[dict], dpo: list[dict]) -> dict[str, list[tuple[dict, str]]]:
    """(record, response) pairs per evaluated model: SFT on its test split, and SFT vs DPO on the DPO test split."""
    return {
        "sft": [(r, r["model_response"]) for r in sft],
        "sft_on_preference": [(r, r["reference_response"]) for r in dpo],
        "dpo": [(r, r["model_response"]) for r in dpo],
    }


TABLE_COLUMNS = [
    "model",
    "instruction",
    "input",
    "output",
    "response",
    "score",
    "score_std",
    "judge_reply",
    "rouge_l_f1",
    "exact_match",
]


def evaluate(
    sets: dict[str, list[tuple[dict, str]]], params: EvaluateParams, cache_path: Path
) -> tuple[dict, pd.DataFrame]:
    """Score every set (judge when reachable) and compute reference metrics; returns (metrics, per-record table)."""
    cfg = params.judge_config()
    status, digest = "ok", None
    try:
        digest = check_judge(cfg)
    except JudgeUnavailableError as exc:
        if params.judge.required:
            raise
        status = "unreachable"
        LOG.warning("judge unreachable, scoring skipped: %s", exc)
    cache = JudgmentCache(cache_path)
    rows, replies, models = [], [], {}
    for name, items in sets.items():
        items = items[: params.max_records] if params.max_records is not None else items
        runs = (
            [score_responses(items, cfg, cache, digest=digest, repeat=k) for k in range(cfg.repeats)]
            if status == "ok"
            else [[{"score": None, "reply": None, "cached": False}] * len(items)]
        )
        rouge = [rouge_l_f1(resp, entry["output"]) for entry, resp in items]
        exact = [exact_match(resp, entry["output"]) for entry, resp in items]
        summary = {
            "rouge_l_f1": sum(rouge) / max(len(rouge), 1),
            "exact_match": sum(exact) / max(len(exact), 1),
            "n": len(items),
        }
        repeats = summarize_repeats([[j["score"] for j in run] for run in runs])
        if status == "ok":
            # The headline statistics are over every answer of every repeat; std is across repeats' means.
            # Mean, median and unparsed are over every answer of every repeat; repeat_std is the spread of the
            # repeats' means. n stays the number of responses, answers counts the judge's replies.
            scores = summarize_scores([j["score"] for run in runs for j in run])
            scores["answers"] = scores.pop("n")
            summary.update(scores, repeat_means=repeats["run_means"], repeat_std=repeats["std"])
            summary["cached"] = sum(j["cached"] for run in runs for j in run)
        models[name] = summary
        for i, ((entry, resp), r, e) in enumerate(zip(items, rouge, exact, strict=True)):
            answers = [run[i] for run in runs]
            rows.append(
                {
                    "model": name,
                    "instruction": entry["instruction"],
                    "input": entry["input"],
                    "output": entry["output"],
                    "response": resp,
                    "score": repeats["per_response"][i]["mean"],
                    "score_std": repeats["per_response"][i]["std"],
                    "judge_reply": answers[0]["reply"],
                    "rouge_l_f1": r,
                    "exact_match": e,
                }
            )
            if status == "ok":
                replies += [
                    {"set": name, "record": i, "repeat": k, "score": a["score"], "reply": a["reply"]}
                    for k, a in enumerate(answers)
                ]
    table = pd.DataFrame.from_records(rows, columns=TABLE_COLUMNS).astype({"score": "float64"})
    judge = {
        "model": cfg.model,
        "host": cfg.host,
        "digest": digest,
        "options": request_options(cfg),
        "format": "json-schema" if cfg.use_schema else "text",
        "repeats": cfg.repeats,
    }
    metrics = {"judge_status": status, "judge_model": cfg.model, "judge_host": cfg.host, "judge": judge}
    metrics["models"] = models
    if status == "ok":
        ref = table[table.model == "sft_on_preference"]["score"].tolist()
        pol = table[table.model == "dpo"]["score"].tolist()
        metrics["sft_vs_dpo"] = compare_pairwise([_opt(s) for s in ref], [_opt(s) for s in pol])
    return metrics, table, replies


def _read_responses(path: Path, key: str) -> list[dict]:
    """A stage's responses JSON, checked for the fields evaluation needs."""
    try:
        records = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record {i}: expected an object, got {type(r).__name__}")
        missing = [k for k in ("instruction", "input", "output", key, "model_response") if k not in r]
        if missing:
            raise UserError(f"{path}: record {i}: missing {', '.join(missing)}")
    return records


def _opt(value) -> float | None:
    return None if pd.isna(value) else float(value)


def plot_scores(table: pd.DataFrame, path: Path) -> None:
    """Histogram of judge scores per model (an explanatory placeholder figure when nothing was scored)."""
    with figure(path, title="LLM-judge score distribution") as ax:
        scored = table.dropna(subset=["score"])
        if scored.empty:
            ax.text(
                0.5,
                0.5,
                "no judge scores\n(judge unreachable or no parsable replies)",
                ha="center",
                va="center",
            )
            ax.set_axis_off()
            return
        for name, group in scored.groupby("model"):
            ax.hist(group["score"], bins=range(0, 105, 5), alpha=0.5, label=name)
        ax.set_xlabel("judge score (0-100)")
        ax.set_ylabel("responses")
        ax.legend()


@stage_main("evaluate")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=Path, required=True, help="SFT test-set responses (JSON)")
    parser.add_argument("--dpo", type=Path, required=True, help="DPO test-set responses (JSON)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--table", type=Path, required=True, help="per-record scores (Parquet)")
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="judgment cache (JSONL), kept across runs")
    args = parser.parse_args()
    params = load_section("evaluate", EvaluateParams)

    with tracking.stage_run("evaluate", params):
        sets = response_sets(
            _read_responses(args.sft, "model_response"), _read_responses(args.dpo, "reference_response")
        )
        metrics, table, replies = evaluate(sets, params, args.cache)
        write_json(args.metrics, metrics)
        atomic_write(args.table, lambda tmp: table.to_parquet(tmp, index=False))
        plot_scores(table, args.plot)
        tracking.log_metrics(
            {k: v for k, v in metrics.items() if k != "judge"}
        )  # the judge's settings are params
        tracking.mlflow.log_param("judge.digest", str(metrics["judge"]["digest"]))
        tracking.mlflow.log_table(data=table, artifact_file="evaluation_table.json")
        if replies:  # every raw judge reply, each repeat apart: what the scores were read from
            tracking.mlflow.log_text(
                "".join(json.dumps(r) + "\n" for r in replies), artifact_file="judge_replies.jsonl"
            )
        tracking.log_outputs("evaluate")
        evaluations = log_evaluations(
            sets,
            params.judge_config(),
            args.cache,
            status=metrics["judge_status"],
            digest=metrics["judge"]["digest"],
            max_records=params.max_records,
        )
    for name, m in metrics["models"].items():
        spread = (
            f" ± {m['repeat_std']:.1f} over {len(m['repeat_means'])} repeats"
            if len(m.get("repeat_means", [])) > 1
            else ""
        )
        judged = (
            f"judge mean {m['mean']:.1f}{spread}, unparsed {m['unparsed']}/{m['answers']}"
            if "mean" in m and m["mean"] is not None
            else f"judge: {metrics['judge_status']}"
        )
        print(f"evaluate: {name:<18} ROUGE-L {m['rouge_l_f1']:.3f}  {judged}")
    if metrics["judge_status"] != "ok":
        print(f"evaluate: no judge at {metrics['judge_host']}: reference metrics only")
    runs = ", ".join(f"{m} {e['traces']} rows" for m, e in evaluations.items())
    print(f"evaluate: MLflow evaluations: {runs}")


if __name__ == "__main__":
    main()
