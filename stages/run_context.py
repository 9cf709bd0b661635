"""One pipeline execution: its id and its MLflow parent run, whatever started it.

An execution is ``./run.sh pipeline`` (with or without Prefect), a Prefect deployment's flow run, one plain
``dvc repro`` or one ``dvc exp run``. Its id (``gptlab.pipeline_run_id`` on every run) is minted here and only
here (:func:`pipeline_run_id`), and its MLflow parent run, under which the stage runs nest, is found or
created here (:func:`parent_run`) and closed here (:func:`finish`):

* an entry point that runs several stages (the runner, the Prefect flow) wraps them in :func:`execution`,
  which exports the id and the parent run to the stages (``GPTLAB_PIPELINE_RUN_ID``,
  ``GPTLAB_MLFLOW_PARENT_RUN_ID``) and closes the parent with the execution's outcome;
* a stage started by DVC alone finds the parent by the id (``dvc exp run``: from the experiment's name; a plain
  ``dvc repro``: from the ``dvc`` process running the stages) or creates it, and closes it with its own outcome.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from stages.params import read_params

RUN_ID = "GPTLAB_PIPELINE_RUN_ID"
PARENT = "GPTLAB_MLFLOW_PARENT_RUN_ID"
FLOW_RUN = "GPTLAB_PREFECT_FLOW_RUN_ID"


def pipeline_run_id() -> str:
    """This execution's id: inherited from the entry point, else ``exp-<name>`` under ``dvc exp run``, else
    the ``dvc repro`` process running this stage, else a new ``run-<hex>``; exported to child processes."""
    run_id = os.environ.get(RUN_ID)
    if not run_id:
        exp = os.environ.get("DVC_EXP_NAME")
        run_id = f"exp-{exp}" if exp else (_dvc_invocation() or f"run-{uuid.uuid4().hex[:12]}")
        os.environ[RUN_ID] = run_id
    return run_id


def _dvc_invocation() -> str | None:
    """An id of the ``dvc repro`` process running this stage, so the stages of one plain ``dvc repro`` group.

    DVC starts each stage as a child (possibly through ``sh -c``); the invocation is identified by that
    ancestor's pid and start time. psutil comes with DVC.
    """
    try:
        import psutil

        proc = psutil.Process().parent()
        for _ in range(4):
            if proc is None:
                return None
            args = [os.path.basename(a) for a in proc.cmdline()]
            if "repro" in args and ("dvc" in args or proc.name() in ("dvc", "dvc.exe")):
                return f"dvc-{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
    except Exception:  # no psutil, no permission, a process that vanished: fall back to a new id
        return None
    return None


def _git(root: Path | None, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(root: Path | None = None) -> str:
    return _git(root, "rev-parse", "HEAD") or "unknown"


def git_source(root: Path | None = None) -> dict[str, str]:
    """MLflow's source tags for the checkout: the commit (the runs table's Version), its branch, the ``origin``
    remote (the UI links the commit where it is GitHub or GitLab), and whether tracked files had uncommitted
    changes (then the commit alone does not say which code ran)."""
    tags = {"mlflow.source.git.commit": git_commit(root)}
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = _git(root, "remote", "get-url", "origin")
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
    status = _git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags["gptlab.git_dirty"] = "true" if status else "false"
    return tags


def run_tags(root: Path | None = None) -> dict[str, str]:
    """Tags shared by an execution's parent run and all its stage runs."""
    root = root or Path.cwd()
    tags = {
        "gptlab.pipeline_run_id": pipeline_run_id(),
        **git_source(root),
        "gptlab.profile": str(read_params(root / "params.yaml").get("profile", "custom")),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get(FLOW_RUN):
        tags["prefect.flow_run_id"] = os.environ[FLOW_RUN]
    return tags


def owned_by_entry_point() -> bool:
    """Whether an entry point (:func:`execution`) owns the parent run and will close it."""
    return bool(os.environ.get(PARENT))


def parent_run(experiment_id: str) -> str:
    """The execution's MLflow parent run: the entry point's, else found by the pipeline-run id, else created."""
    if os.environ.get(PARENT):
        return os.environ[PARENT]
    rid = pipeline_run_id()
    found = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`gptlab.pipeline_run_id` = '{rid}' and tags.`gptlab.role` = 'pipeline'",
        max_results=1,
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    run = mlflow.MlflowClient().create_run(
        experiment_id, run_name=f"pipeline {rid}", tags={**run_tags(), "gptlab.role": "pipeline"}
    )
    return run.info.run_id


def finish(parent: str, status: str) -> None:
    """Close the parent run with ``status`` (``FINISHED`` or ``FAILED``)."""
    mlflow.MlflowClient().set_terminated(parent, status)


@contextmanager
def execution(experiment_id: str, *, flow_run_id: str | None = None) -> Iterator[str]:
    """Run stages as one execution: yields the parent run id (also exported for the stages' processes);
    on exit the parent is closed as FINISHED, or FAILED if the block raised, and the environment restored."""
    saved = {k: os.environ.get(k) for k in (RUN_ID, PARENT, FLOW_RUN)}
    os.environ.pop(PARENT, None)
    if flow_run_id:
        os.environ[FLOW_RUN] = flow_run_id
    pipeline_run_id()
    parent = parent_run(experiment_id)
    os.environ[PARENT] = parent
    status = "FAILED"
    try:
        yield parent
        status = "FINISHED"
    finally:
        finish(parent, status)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
