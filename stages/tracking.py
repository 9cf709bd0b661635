"""MLflow logging shared by every stage.

Default store: SQLite ``mlflow.db`` at the repository root with artifacts in ``mlartifacts/`` (``mlflow ui
--backend-store-uri sqlite:///mlflow.db`` shows them). ``MLFLOW_TRACKING_URI`` switches to a tracking server; an
unreachable server fails fast with one line instead of MLflow's minutes of retries.

Each stage run is tagged with the git commit, the DVC stage name, the profile and ``gptlab.pipeline_run_id``
(``GPTLAB_PIPELINE_RUN_ID``, set once per pipeline execution by the Prefect flow / ``./run.sh pipeline``) so
all stages of one pipeline run can be grouped in the UI.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Fail fast against a dead server: MLflow's defaults retry for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

import mlflow  # noqa: E402  (after the env defaults above, which MLflow reads at import)

from stages.params import read_params  # noqa: E402

EXPERIMENT = os.environ.get("GPTLAB_EXPERIMENT", "gptlab")


class TrackingUnavailableError(RuntimeError):
    """The configured MLflow tracking server cannot be reached."""


def tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def health_problem(base_url: str, timeout: float = 5.0) -> str | None:
    """Why ``<base_url>/health`` does not answer (None when it does); MLflow and Prefect servers both serve it."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=timeout):
            return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    reason = health_problem(uri, timeout)
    if reason is not None:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server ...) "
            "or unset MLFLOW_TRACKING_URI to use the local sqlite store"
        ) from None


def configure(root: Path | None = None) -> str:
    """Point MLflow at the tracking store and the ``gptlab`` experiment; returns the experiment id."""
    root = (root or Path.cwd()).resolve()
    uri = tracking_uri(root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    artifacts = None if uri.startswith(("http://", "https://")) else (root / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/dataclasses to ``a.b.c`` keys (MLflow params are flat)."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def pipeline_run_id() -> str:
    """The id grouping this pipeline execution's stage runs.

    Set by the Prefect flow / ``./run.sh pipeline``; under ``dvc exp run`` it is derived from the experiment's
    name (DVC exports ``DVC_EXP_NAME`` to every stage); a stage run alone gets its own.
    """
    run_id = os.environ.get("GPTLAB_PIPELINE_RUN_ID")
    if not run_id:
        exp = os.environ.get("DVC_EXP_NAME")
        run_id = f"exp-{exp}" if exp else (_dvc_invocation() or f"adhoc-{uuid.uuid4().hex[:12]}")
        os.environ["GPTLAB_PIPELINE_RUN_ID"] = run_id
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
    except Exception:  # no psutil, no permission, a process that vanished: fall back to a per-stage id
        return None
    return None


def run_tags(root: Path | None = None) -> dict[str, str]:
    """Tags shared by a pipeline execution's parent run and all its stage runs."""
    root = root or Path.cwd()
    tags = {
        "gptlab.pipeline_run_id": pipeline_run_id(),
        "mlflow.source.git.commit": git_commit(root),
        "gptlab.profile": str(read_params(root / "params.yaml").get("profile", "custom")),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("GPTLAB_PREFECT_FLOW_RUN_ID"):
        tags["prefect.flow_run_id"] = os.environ["GPTLAB_PREFECT_FLOW_RUN_ID"]
    return tags


def parent_run_id(experiment_id: str) -> str:
    """The MLflow run of this pipeline execution that stage runs nest under (created on first use).

    The Prefect flow creates it up front and exports ``GPTLAB_MLFLOW_PARENT_RUN_ID``; otherwise (``dvc exp run``,
    plain ``dvc repro``) the first stage creates it and later stages find it by the pipeline-run-id tag.
    """
    if os.environ.get("GPTLAB_MLFLOW_PARENT_RUN_ID"):
        return os.environ["GPTLAB_MLFLOW_PARENT_RUN_ID"]
    rid = pipeline_run_id()
    found = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`gptlab.pipeline_run_id` = '{rid}' and tags.`gptlab.role` = 'pipeline'",
        max_results=1,
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id, run_name=f"pipeline {rid}", tags={**run_tags(), "gptlab.role": "pipeline"}
    )
    return run.info.run_id


@contextmanager
def stage_run(stage: str, params: Any) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one DVC stage, with its params section logged and the grouping tags set."""
    experiment_id = configure()
    tags = {**run_tags(), "gptlab.stage": stage, "dvc.stage": stage, "gptlab.role": "stage"}
    owned_by_flow = bool(os.environ.get("GPTLAB_MLFLOW_PARENT_RUN_ID"))
    parent = parent_run_id(experiment_id)
    status = "FAILED"
    try:
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, tags=tags, parent_run_id=parent
        ) as run:
            flat = flatten(params)
            # MLflow caps a param value at 6000 chars; long lists (prompts) are artifacts anyway.
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
            yield run
        status = "FINISHED"
    finally:
        if not owned_by_flow:
            # Without a flow nobody else closes the parent: it reflects the latest stage's outcome.
            mlflow.MlflowClient().set_terminated(parent, status)


def metrics_logger(prefix: str = "") -> Callable[[int, dict[str, float]], None]:
    """A :func:`gptlab.train.train` callback that forwards step metrics to the active MLflow run."""

    def log(step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=step)

    return log


def log_metrics(metrics: dict[str, Any], prefix: str = "") -> None:
    """Log the numeric entries of a stage's final metrics dict."""
    numeric = {
        f"{prefix}{k}": float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    mlflow.log_metrics(numeric)


MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def log_model(checkpoint: Path, *, registered_name: str | None = None, metrics: dict[str, Any] | None = None):
    """Log ``checkpoint`` as an MLflow pyfunc model with ``metrics`` attached; register it under ``registered_name``.

    Returns the registered ModelVersion (or the logged model info when not registering).
    """
    import gptlab

    numeric = {
        k: float(v)
        for k, v in flatten(metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(gptlab.__file__).parent)],
        pip_requirements=["torch>=2.13", "tiktoken>=0.9", "safetensors>=0.4", "numpy", "pyarrow", "tqdm"],
    )
    if numeric:
        mlflow.log_metrics(numeric, model_id=info.model_id)
    if registered_name is None:
        return info
    version = mlflow.register_model(
        info.model_uri, registered_name, tags={k: str(v) for k, v in numeric.items()}
    )
    print(f"registered {registered_name} version {version.version}")
    return version
