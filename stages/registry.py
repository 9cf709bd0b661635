"""Stage checkpoints as MLflow models: logged as pyfunc models, registered, found again by their weights.

Only the stages that produce or read a model import this (it pulls in :mod:`gptlab.checkpoint`), so the data
stages' code deps stay free of model code. Logging goes to the active run that :mod:`stages.tracking` opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptlab.checkpoint import WEIGHTS
from gptlab.fileio import sha256_file
from stages.entry import stage_log
from stages.tracking import flatten, mlflow

LOG = stage_log("registry")

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
WEIGHTS_TAG = "gptlab.weights_sha256"


def weights_sha256(checkpoint: Path) -> str:
    return sha256_file(Path(checkpoint) / WEIGHTS)


def registered_version(name: str, checkpoint: Path):
    """The newest version of registered model ``name`` whose weights are ``checkpoint``'s (None if none is): the
    model a stage read, even when DVC's cache skipped the stage that registered it or other runs registered more."""
    digest = weights_sha256(checkpoint)
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    matching = [v for v in versions if v.tags.get(WEIGHTS_TAG) == digest]
    return max(matching, key=lambda v: int(v.version), default=None)


def log_model(checkpoint: Path, *, registered_name: str | None = None, metrics: dict[str, Any] | None = None):
    """Log ``checkpoint`` as an MLflow pyfunc model with ``metrics`` attached; register it under ``registered_name``,
    the version tagged with its weights' sha256 (``gptlab.weights_sha256``: later stages find the version of the
    files they read, :func:`registered_version`).

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
    tags = {k: str(v) for k, v in numeric.items()} | {WEIGHTS_TAG: weights_sha256(checkpoint)}
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    LOG.info("registered %s version %s", registered_name, version.version)
    return version
