"""Stage ``benchmark``: the base, SFT and DPO models on lm-evaluation-harness tasks, through gptlab's lm-eval model
(:mod:`stages.lm_harness`).

``benchmark.tasks`` names lm-eval tasks: this project's offline ones in ``benchmark.include_path`` (the sample
profile's ``gptlab_choice``, a multiple choice, and ``gptlab_ppl``, a perplexity task, both on the sample corpus)
or lm-eval's own (``hellaswag``, ``arc_easy``, ``piqa``, ``lambada_openai``…), which it downloads from the Hugging
Face hub when the machine is online. Each task's metrics (with their standard errors where lm-eval bootstraps
them) per model go to ``metrics/benchmark.json`` and to MLflow as ``<model>.<task>.<metric>``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.errors import UserError
from gptlab.fileio import write_json
from stages import tracking
from stages.entry import stage_log, stage_main
from stages.launch import resolve_device
from stages.params import load_section

LOG = stage_log("benchmark")
HIDDEN = {"sample_len"}
"""Left out of the summary line (kept in the metrics): the number of documents."""


@dataclass
class BenchmarkParams:
    tasks: list[str] = field(default_factory=lambda: ["gptlab_choice", "gptlab_ppl"])
    """lm-eval task names (local ones from ``include_path`` or lm-eval's own)."""
    include_path: str | None = "benchmarks/tasks"
    """Directory of task YAMLs in lm-eval's local-task format (relative to the repository root)."""
    num_fewshot: int | None = None
    """Few-shot examples per question (None: each task's default)."""
    limit: int | None = None
    """At most this many documents per task (None: all)."""
    batch_size: int = 8
    bootstrap_iters: int = 1000
    """Resamples for the metrics' standard errors (0: none)."""
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise UserError("benchmark.tasks is empty: name at least one lm-eval task")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise UserError(f"benchmark.include_path: {self.include_path} is not a directory")


def benchmark(params: BenchmarkParams, models: dict[str, Path], device: str) -> dict[str, dict[str, dict]]:
    """{model: {task: {metric: value}}} for every model on every task; no files written."""
    import lm_eval
    import torch.utils.collect_env as collect_env
    from lm_eval.tasks import TaskManager

    from stages.lm_harness import GptlabLM

    # simple_evaluate describes the environment for its report (torch's collect_env: a dozen subprocesses, ~1.3 s)
    # on every call; it cannot change between the models of one stage, so it is asked once.
    collect_env.get_pretty_env_info = functools.cache(collect_env.get_pretty_env_info)

    # lm-eval indexes its thousands of built-in task files only when a task is not one of ours.
    manager = TaskManager(include_path=params.include_path, include_defaults=False)
    local = set(manager.all_tasks) if params.include_path is not None else set()
    if not set(params.tasks) <= local:
        manager = TaskManager(include_path=params.include_path)
    unknown = [t for t in params.tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"benchmark.tasks: unknown lm-eval task {', '.join(unknown)} (local tasks: {', '.join(sorted(local))})"
        )
    if set(params.tasks) <= local:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON files: nothing to fetch
    results = {}
    for name, checkpoint in models.items():
        LOG.info("%s: %s on %s", name, ", ".join(params.tasks), checkpoint)
        out = lm_eval.simple_evaluate(
            model=GptlabLM(checkpoint, batch_size=params.batch_size, device=device),
            tasks=list(params.tasks),
            task_manager=manager,
            num_fewshot=params.num_fewshot,
            limit=params.limit,
            bootstrap_iters=params.bootstrap_iters,
            log_samples=False,
        )
        results[name] = {task: _metrics(values) for task, values in out["results"].items()}
    return results


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` as ``{"acc": 0.5, "acc_stderr": 0.1}``
    (numbers only; an undefined standard error is left out)."""
    out = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[metric if filt in ("", "none") else f"{metric}.{filt}"] = float(value)
    return out


@stage_main("benchmark")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=CHECKPOINT",
        help="a model to evaluate (repeat)",
    )
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    params = load_section("benchmark", BenchmarkParams)
    models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model {spec!r}: expected NAME=CHECKPOINT")
        models[name] = Path(path)
    with tracking.stage_run("benchmark", params):
        results = benchmark(params, models, resolve_device(params.device))
        write_json(args.metrics, results)
        tracking.log_metrics(results)
        tracking.log_outputs("benchmark")
    for name, tasks in results.items():
        shown = "  ".join(
            f"{task} "
            + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k not in HIDDEN and "_stderr" not in k)
            for task, m in tasks.items()
        )
        print(f"benchmark: {name:<5} {shown}")


if __name__ == "__main__":
    main()
