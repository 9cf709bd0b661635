"""Prefect flow: one task per DVC stage, in DVC's topological order.

The graph is read from ``dvc.yaml`` through DVC's own API (never restated here); each task runs
``dvc repro --single-item <stage>``, so a stage whose deps and params did not change is skipped by DVC's cache.
Each task publishes the stage's metrics as a Prefect table artifact. The download stage retries (network).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

from pipelines import report
from pipelines.graph import dvc_stages, removed_outputs, sweep_work
from pipelines.profile import activate, apply_overrides
from stages import run_context, tracking

TASK_RETRIES = {"download": 2}
"""Stages worth retrying: only the one that talks to the network."""
CONSOLE: IO[str] | None = None
"""Where ``./run.sh pipeline`` shows progress (the terminal, while everything else goes to its log file)."""


PROGRESS_LOGGER = "progress"
"""Child of the run's Prefect logger carrying the progress lines: the UI shows them, and ``./run.sh pipeline
--stack`` follows a run on a worker by reading them back from the API (:mod:`pipelines.stack_run`)."""


def show(line: str) -> None:
    """A progress line on the console, cut to the terminal's width, and in the run's Prefect log."""
    if CONSOLE is not None:
        width = shutil.get_terminal_size((80, 24)).columns
        CONSOLE.write((line if len(line) <= width else line[: width - 1] + "…") + "\n")
        CONSOLE.flush()
    with contextlib.suppress(MissingContextError):
        get_run_logger().getChild(PROGRESS_LOGGER).info(line)


def echo(line: str) -> None:
    """A line of DVC's output on stdout: the log file locally, the worker's pipe on a worker. A worker that died
    (``kill -9``) leaves a pipe nobody reads; the run is then orphaned (:func:`watch_worker`)."""
    try:
        print(line, end="", flush=True)
    except BrokenPipeError:
        orphaned()


def orphaned() -> None:
    """This flow run lost the worker that started it: stop writing to its pipe and end the run the way Prefect
    ends a terminated one (SIGTERM → ``TerminationSignal`` → the run is marked Crashed), stopping the stage."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.kill(os.getpid(), signal.SIGTERM)


def watch_worker(interval: float = 1.0) -> None:
    """On a worker (``PREFECT__FLOW_RUN_ID`` set), end this run when the worker process dies.

    A process worker starts each flow run as its child in a new session, so ``kill -9`` of the worker leaves
    the run going with nobody to report for it, and Prefect's server never hears that it ended (it would stay
    Running). The watcher notices the parent change and ends the run as Crashed; the next run resumes from
    the stage's checkpoints. Not for local runs: ``nohup ./run.sh pipeline &`` outlives its shell on purpose.
    """
    if not os.environ.get("PREFECT__FLOW_RUN_ID"):
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        orphaned()

    threading.Thread(target=watch, name="gptlab-worker-watch", daemon=True).start()


def stage_env() -> dict[str, str]:
    """Environment for ``dvc repro``: this interpreter's bin first (stages run ``python -m stages.x``); the
    execution's ids (:mod:`stages.run_context`) are in the environment already."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@task(task_run_name="{stage}")
def run_stage(
    stage: str,
    root: str,
    metrics: list[str],
    force: bool = False,
    work: list[str] | None = None,
    outs: list[str] | None = None,
) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``; returns whether it ran and its metrics. On success the stage is up
    to date, so its ``work`` directories hold nothing left to resume and are removed. On failure the error
    says which of the stage's previous ``outs`` DVC removed before running it, and how to get them back."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("running %s", " ".join(cmd[2:]))
    # Its own session: a run that ends early (cancelled, its worker killed) stops DVC and the stage with it.
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            echo(line)
            # The stage's own messages are progress; DVC's and the libraries' go to the log only.
            if line.startswith(f"{stage}: "):
                show("  " + line.rstrip())
        proc.wait()
    finally:
        if proc.poll() is None:
            stop_group(proc)
    if proc.returncode != 0:
        # The stage's own one-line error says more than DVC's "failed to reproduce" wrapper.
        own = [ln for ln in lines if ln.startswith(f"{stage}: error:")]
        tail = next((ln for ln in reversed(lines) if ln.strip()), "no output")
        message = (
            f"stage {stage} failed: {own[-1].strip()}"
            if own
            else (f"stage {stage} failed (dvc exit {proc.returncode}): {tail.strip()}")
        )
        gone = removed_outputs(Path(root), stage, outs or [])
        if gone:
            message += (
                f"\n  DVC removed its previous outputs before running it ({', '.join(gone)}): "
                f"`dvc checkout {stage}` restores them"
            )
        raise RuntimeError(message)
    ran = any(f"Running stage '{stage}'" in ln for ln in lines)
    sweep_work(Path(root), work or [])
    values: dict[str, Any] = {}
    for path in metrics:
        file = Path(root) / path
        if file.is_file():
            values.update(json.loads(file.read_text()))
    rows = [{"metric": k, "value": v} for k, v in values.items() if isinstance(v, int | float | str)]
    if rows:
        create_table_artifact(
            key=f"{stage.replace('_', '-').lower()}-metrics",
            table=rows,
            description=f"{stage}: {'ran' if ran else 'unchanged (DVC cache)'}",
        )
    logger.info("stage %s %s", stage, "ran" if ran else "was up to date")
    if not ran:
        show(f"  {stage}: up to date (DVC cache)")
    return {"stage": stage, "ran": ran, "metrics": values}


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the stage's process group (DVC, the shell, the stage), SIGKILL after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def dvc_push(root: str, remote: str, targets: list[str]) -> str:
    """``dvc push -r <remote> <targets>``; DVC's summary line. An object store that is down fails in one line
    (``RuntimeError``) once DVC's own connection retries are spent (about 10 s)."""
    cmd = [sys.executable, "-m", "dvc", "push", "-r", remote, *targets]
    proc = subprocess.run(cmd, cwd=root, env=stage_env(), capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        echo(line + "\n")
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or ["no output"]
        reason = errors[-1].removeprefix("ERROR: ").removeprefix("unexpected error - ")
        raise RuntimeError(f"dvc push to remote {remote!r} failed: {reason}")
    said = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    return said[-1] if said else "done"


@task(task_run_name="push to {remote}", retries=2, retry_delay_seconds=10)
def push_outputs(root: str, remote: str, stages: list[str]) -> str:
    """The stages' outputs to a DVC remote, so every worker and teammate shares them; retried twice, 10 s
    apart, for an object store that is briefly down."""
    summary = dvc_push(root, remote, stages)
    show(f"  pushed to DVC remote {remote!r}: {summary}")
    return summary


@flow(name="gptlab-pipeline", log_prints=False)
def pipeline(
    root: str = ".",
    target: str | None = None,
    force: bool = False,
    profile: str | None = None,
    set_params: list[str] | None = None,
    push: str | None = None,
) -> list[dict[str, Any]]:
    """Run the DVC pipeline stage by stage (all stages, or up to ``target``).

    ``profile`` first switches params.yaml to ``profiles/<profile>.yaml``; ``set_params`` then applies
    ``section.key=value`` overrides (as ``dvc exp run -S`` does), so a scheduled deployment can run variants.
    ``push`` names a DVC remote the stages' outputs are pushed to once they all succeeded (the team stack's
    ``stack``, docs/stack.md).
    """
    watch_worker()
    root_path = Path(root).resolve()
    if profile is not None:
        activate(profile, root_path)
    if set_params:
        apply_overrides(set_params, root_path)
    with contextlib.chdir(root_path):
        stages = dvc_stages(root_path, target)  # inside the root: DVC names stages relative to the cwd
        flow_id = str(flow_run.id) if flow_run.id else None
        with run_context.execution(tracking.configure(), flow_run_id=flow_id) as parent:
            results: list[dict[str, Any]] = []
            try:
                for i, stage in enumerate(stages, start=1):
                    show(f"[{i}/{len(stages)}] {stage['name']}")
                    runner = run_stage.with_options(
                        retries=TASK_RETRIES.get(stage["name"], 0), retry_delay_seconds=5
                    )
                    results.append(
                        runner(
                            stage["name"],
                            str(root_path),
                            stage["metrics"],
                            force,
                            stage["work"],
                            stage["outs"],
                        )
                    )
                if push:
                    push_outputs(str(root_path), push, [stage["name"] for stage in stages])
            finally:
                report_to_parent_run(root_path, parent, stages)
    return results


def report_to_parent_run(root: Path, parent: str, stages: list[dict[str, Any]]) -> None:
    """Attach the summary report (metrics, curves, confusion matrix, judge scores, links) to the parent run."""
    client = tracking.mlflow.MlflowClient()
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    stage_runs = {r.data.tags.get("gptlab.stage", r.info.run_name): r.info.run_id for r in children}
    tags = client.get_run(parent).data.tags
    links = {
        "pipeline run id": tags.get("gptlab.pipeline_run_id", "?"),
        "git commit": tags.get("mlflow.source.git.commit", "?"),
        "profile": tags.get("gptlab.profile", "?"),
        "DVC experiment": os.environ.get("DVC_EXP_NAME", "workspace (dvc repro)"),
        "Prefect flow run": str(flow_run.id or "-"),
        "MLflow parent run": parent,
    }
    markdown, page = report.build(root, stages, links, stage_runs)
    client.log_text(parent, markdown, "pipeline_summary.md")
    client.log_text(parent, page, "pipeline_summary.html")
    for stage_name, values in report.key_metrics(root, stages).items():
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                client.log_metric(parent, f"{stage_name}.{key}", float(value))
