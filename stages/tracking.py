"""MLflow logging shared by every stage.

Default store: SQLite ``mlflow.db`` at the repository root with artifacts in ``mlartifacts/`` (``mlflow ui
--backend-store-uri sqlite:///mlflow.db`` shows them). ``MLFLOW_TRACKING_URI`` switches to a tracking server; an
unreachable server fails fast with one line instead of MLflow's minutes of retries.

Each stage run is tagged with the git commit, the DVC stage name, the profile and ``gptlab.pipeline_run_id``
and nests under its execution's parent run (:mod:`stages.run_context`), so all stages of one pipeline run
group in the UI.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Fail fast against a dead server: MLflow's defaults retry for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
# A stage's output is its own progress and result lines: no artifact-download bars, no INFO chatter (the
# stage says "registered <name> version <n>" itself), no advice about pyfunc type hints.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")

import mlflow  # noqa: E402  (after the env defaults above, which MLflow reads at import)

logging.getLogger("mlflow").setLevel(logging.WARNING)  # after the import, which configures it

from mlflow.data.dataset_source import DatasetSource  # noqa: E402

from gptlab.errors import UserError  # noqa: E402
from stages import run_context  # noqa: E402

EXPERIMENT = os.environ.get("GPTLAB_EXPERIMENT", "gptlab")
# MLflow 3's UI opens an experiment by its kind: the model-training view (runs, metric charts), not GenAI's.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class TrackingUnavailableError(UserError, RuntimeError):
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
    if exp is None:
        artifacts = None if uri.startswith(("http://", "https://")) else (root / "mlartifacts").as_uri()
        try:
            experiment_id = mlflow.create_experiment(
                EXPERIMENT, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND])
            )
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage
            experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    else:
        experiment_id = exp.experiment_id
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # an experiment made by an older version
            mlflow.MlflowClient().set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)  # the active one: where traces (evaluations) go too
    return experiment_id


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


@contextmanager
def stage_run(stage: str, params: Any) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one DVC stage, nested under its execution's parent run (:mod:`stages.run_context`),
    with its params section logged and the grouping tags set."""
    experiment_id = configure()
    tags = {
        **run_context.run_tags(),
        "gptlab.stage": stage,
        "dvc.stage": stage,
        "gptlab.role": "stage",
        # The runs table's Source: the stage's module, whatever path the interpreter was started from.
        "mlflow.source.name": f"stages/{stage}.py",
        "mlflow.source.type": "LOCAL",
    }
    owned = run_context.owned_by_entry_point()
    parent = run_context.parent_run(experiment_id)
    status = "FAILED"
    try:
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, tags=tags, parent_run_id=parent
        ) as run:
            flat = flatten(params)
            # MLflow caps a param value at 6000 chars; long lists (prompts) are artifacts anyway.
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
            log_inputs(stage)
            yield run
        status = "FINISHED"
    finally:
        if not owned:
            # Started by DVC alone: nobody else closes the parent, which shows the latest stage's outcome.
            run_context.finish(parent, status)


def metrics_logger(prefix: str = "") -> Callable[[int, dict[str, float]], None]:
    """A :func:`gptlab.train.train` callback that forwards step metrics to the active MLflow run."""

    def log(step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=step)

    return log


def log_samples(step: int, rows: list[dict[str, str]]) -> None:
    """Sample completions at a training step, appended to the run's ``samples_by_step.json`` table."""
    table = {
        "step": [step] * len(rows),
        "prompt": [r["prompt"] for r in rows],
        "completion": [r["completion"] for r in rows],
    }
    mlflow.log_table(data=table, artifact_file="samples_by_step.json")


def log_metrics(metrics: dict[str, Any], prefix: str = "") -> None:
    """Log the numeric entries of a stage's final metrics dict as metrics, the text ones (the precision used,
    a model's source) as params under ``result.``."""
    flat = flatten(metrics)
    numeric = {
        f"{prefix}{k}": float(v)
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    mlflow.log_metrics(numeric)
    text = {f"result.{k}": v for k, v in flat.items() if isinstance(v, str)}
    if text:
        mlflow.log_params(text)


class DvcSource(DatasetSource):
    """A path DVC tracks in the repository, as an MLflow dataset's source (source type ``dvc``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, **kwargs) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # never guessed from a bare string: made explicitly by log_inputs

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcSource:
        return cls(source_dict["path"])


@functools.cache
def _declared(stage: str, root: Path) -> tuple[tuple[tuple[str, str | None], ...], tuple[Path, ...]]:
    """``stage``'s data/model deps with their DVC md5s, and its declared outputs, read with one opening of the
    DVC project (every stage asks for both: the inputs when its run starts, the outputs when it ends)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    inputs, outputs = [], []
    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            if s.addressing != stage:
                continue
            outputs += [root / o.def_path for o in s.outs]
            for dep in s.deps:
                path = Path(dep.def_path)
                if isinstance(dep, ParamsDependency) or path.suffix == ".py" or not (root / path).exists():
                    continue
                digest = dep.get_hash()
                inputs.append((path.as_posix(), digest.value.removesuffix(".dir") if digest else None))
    return tuple(inputs), tuple(outputs)


def declared_inputs(stage: str, root: Path | None = None) -> list[tuple[str, str | None]]:
    """(path, DVC md5) of every data and model dependency dvc.yaml declares for ``stage`` (code and params
    left out), hashed by DVC itself (its state cache makes an unchanged file or directory free to re-hash); a
    directory's md5 is that of DVC's ``.dir`` listing. Empty outside a DVC project."""
    root = (root or Path.cwd()).resolve()
    return list(_declared(stage, root)[0]) if (root / "dvc.yaml").is_file() else []


def declared_outputs(stage: str, root: Path | None = None) -> list[Path]:
    """The files and directories dvc.yaml declares as ``stage``'s outs, metrics and plots, through DVC's API
    (dvc.yaml is the only place paths are written); empty when the stage runs outside a DVC project."""
    root = (root or Path.cwd()).resolve()
    return list(_declared(stage, root)[1]) if (root / "dvc.yaml").is_file() else []


def log_inputs(stage: str) -> None:
    """Log the stage's data and model dependencies as MLflow datasets (the runs table's Dataset column), each
    named by its path and digested by its DVC md5, so two runs on the same data show the same digest."""
    from mlflow.data.meta_dataset import MetaDataset

    inputs = declared_inputs(stage)
    if not inputs:
        return
    mlflow.log_inputs(
        datasets=[MetaDataset(DvcSource(p), name=p, digest=d) for p, d in inputs],
        contexts=["model" if p.startswith("models/") else "data" for p, _ in inputs],
        tags_list=[None] * len(inputs),
    )


def log_outputs(stage: str) -> None:
    """Log the stage's declared output files as run artifacts (directories, i.e. checkpoints and data sets, are
    logged as models or not at all)."""
    for path in declared_outputs(stage):
        if path.is_file():
            mlflow.log_artifact(str(path))
