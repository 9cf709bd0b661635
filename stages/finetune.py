"""What the finetuning stages (``classify``, ``sft``, ``dpo``) share: the params every one of them holds, the
result their pure function returns, and the end of their ``main()``.

Each stage's params dataclass subclasses :class:`FinetuneParams` (``sft`` and ``dpo``, which read the book's ch. 7
JSON records, :class:`RecordsParams`) and adds only its own keys; its pure function returns a
:class:`FinetuneResult`; its ``main()`` parses the paths and hands the rest to :func:`run`: relaunch under
``torchrun`` when asked, train, and on rank 0 alone (:func:`writes_outputs`) :func:`finish`: checkpoint, metrics,
curves, plots, test responses, MLflow and the Model Registry.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from gptlab import distributed
from gptlab.batches import ORDERS
from gptlab.checkpoint import save_checkpoint
from gptlab.fileio import atomic_write, write_json
from gptlab.train import TrainConfig
from stages import registry, tracking
from stages.adapters import LoraParams
from stages.entry import stage_log
from stages.launch import LaunchParams, prepare
from stages.params import check_choice
from stages.plots import plot_confusion, plot_curves, write_history_csv

Callback = Callable[[int, dict[str, float]], None]


@dataclass
class FinetuneParams:
    """The keys every finetuning stage's params section holds."""

    max_length: int | None = None
    """Truncate training sequences to this many tokens; None = the model's context length."""
    batch_size: int = 8
    drop_last: bool = False
    """Drop each epoch's last, incomplete training batch (the book's training DataLoaders do)."""
    data_order: str = "seeded"
    """Shuffled order of the training batches (gptlab.batches.ORDERS): ``seeded`` or ``torch`` (the book's
    DataLoader)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser settings (``train.epochs`` or ``train.max_steps``)."""
    launch: LaunchParams = field(default_factory=LaunchParams)
    """Processes and nodes: more than one trains data-parallel under ``torchrun`` (:mod:`stages.launch`);
    ``batch_size`` is the global batch."""
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("data_order", self.data_order, ORDERS)


@dataclass
class RecordsParams(FinetuneParams):
    """The keys of the stages that train on the book's ch. 7 JSON records (``sft``, ``dpo``)."""

    skip_invalid: bool = False
    """Skip (and count) records with missing/empty fields instead of failing."""
    split_shuffle: bool = True
    """Shuffle the records (seeded) before the 85/10/5 split; false splits in file order, as the book's ch. 7."""
    train_frac: float = 0.85
    test_frac: float = 0.10
    lora: LoraParams | None = None
    """Train LoRA adapters only (appendix E) instead of every weight; None = full finetuning. DPO adapts the
    policy; its reference stays the SFT model."""
    max_new_tokens: int = 256
    """Response length limit when generating test-set responses."""

    def split_settings(self) -> dict[str, Any]:
        """:func:`stages.records.load_splits`'s settings from these params (seeded with ``train.seed``)."""
        return dict(
            skip_invalid=self.skip_invalid,
            train_frac=self.train_frac,
            test_frac=self.test_frac,
            seed=self.train.seed,
            shuffle=self.split_shuffle,
        )


@dataclass
class FinetuneResult:
    """What a finetuning stage's pure function returns (no files written)."""

    model: nn.Module
    """The trained model (GPT or Decoder; LoRA adapters merged if ``lora.merge``)."""
    metrics: dict[str, Any]
    """The final metrics (the stage's metrics JSON)."""
    history: list[dict[str, Any]]
    """One row per logged step (the curves)."""
    meta: dict[str, Any]
    """Checkpoint metadata: the stage, LoRA settings and the stage's own (labels, prompt style, beta, ...)."""
    tokenizer: Any = None
    """The base model's tokenizer (saved with the checkpoint)."""
    responses: list[dict] | None = None
    """``sft``, ``dpo``: the test records with the model's answer as ``model_response`` (the book's layout;
    ``dpo`` adds the reference's (SFT) answer as ``reference_response``)."""
    confusion: list[list[int]] | None = None
    """``classify``: the test split's confusion matrix (rows: true class; labels in ``meta["labels"]``)."""


@dataclass(frozen=True)
class FinetuneStage:
    """How a finetuning stage's outputs look: its name, registered model and curves."""

    name: str
    registered_name: str
    """The Model Registry name the checkpoint is registered under."""
    curves: tuple[str, ...]
    """History columns for the curves CSV (``dvc plots``) and PNG."""
    title: str
    ylabel: str
    metrics_prefix: str = "final_"
    """Prefix of the final metrics' MLflow names (``dpo``'s own keys already say final/initial: none)."""


@dataclass(frozen=True)
class Outputs:
    """Where a finetuning stage writes: its command line's output paths."""

    model: Path
    metrics: Path
    curves_csv: Path
    curves_png: Path
    responses: Path | None = None
    """Test-set responses (JSON); with ``responses_table``, the same as Parquet."""
    responses_table: Path | None = None
    confusion_json: Path | None = None
    confusion_png: Path | None = None

    @staticmethod
    def add_arguments(
        parser: argparse.ArgumentParser,
        *,
        curves: str = "curves",
        responses: bool = False,
        confusion: bool = False,
    ) -> None:
        """The output options: ``--model --metrics --<curves>-csv --<curves>-png`` [``--responses
        --responses-table``] [``--confusion-json --confusion-png``]."""
        parser.add_argument("--model", type=Path, required=True, help="output checkpoint directory")
        parser.add_argument("--metrics", type=Path, required=True)
        parser.add_argument(f"--{curves}-csv", dest="curves_csv", type=Path, required=True)
        parser.add_argument(f"--{curves}-png", dest="curves_png", type=Path, required=True)
        if responses:
            parser.add_argument("--responses", type=Path, required=True, help="test-set responses (JSON)")
            parser.add_argument("--responses-table", type=Path, required=True, help="the same as Parquet")
        if confusion:
            parser.add_argument("--confusion-png", type=Path, required=True)
            parser.add_argument("--confusion-json", type=Path, required=True)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Outputs:
        return cls(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        )


def writes_outputs() -> bool:
    """The one rank rule: rank 0 writes every file, logs to MLflow and registers the model; the other ranks
    train in lockstep with it and write nothing."""
    return distributed.is_main()


def run(
    stage: FinetuneStage,
    params: FinetuneParams,
    train_fn: Callable[[str, Callback | None], FinetuneResult],
    outputs: Outputs,
    *,
    summary: Callable[[FinetuneResult], Iterable[str]],
) -> None:
    """A finetuning stage's ``main()`` once its arguments are read: relaunch under ``torchrun`` when
    ``params.launch`` asks; ``train_fn(device, callback)`` on every rank; on rank 0 alone, inside the stage's
    MLflow run, :func:`finish`, then the ``summary`` lines as ``<stage>: …``."""
    device = prepare(stage.name, params.launch, params.device)
    if not writes_outputs():
        train_fn(device, None)
        return
    with tracking.stage_run(stage.name, params):
        out = train_fn(device, tracking.metrics_logger())
        finish(stage, out, outputs)
    log = stage_log(stage.name)
    for line in summary(out):
        log.info(line)


def finish(stage: FinetuneStage, out: FinetuneResult, outputs: Outputs) -> None:
    """Rank 0's end of a finetuning stage, in its MLflow run: save the checkpoint (with its tokenizer), the test
    responses, the metrics, the curves (CSV and PNG) and the confusion matrix; log the metrics and the declared
    outputs to MLflow; log and register the checkpoint as a model."""
    save_checkpoint(out.model, outputs.model, tokenizer=out.tokenizer, meta=out.meta)
    if out.responses is not None:
        write_responses(out.responses, outputs.responses, outputs.responses_table)
    write_json(outputs.metrics, out.metrics)
    if out.confusion is not None:
        labels = list(out.meta["labels"])
        write_json(outputs.confusion_json, {"labels": labels, "matrix": out.confusion, "split": "test"})
    columns = list(stage.curves)
    write_history_csv(out.history, outputs.curves_csv, columns)
    plot_curves(out.history, outputs.curves_png, columns, title=stage.title, ylabel=stage.ylabel)
    if out.confusion is not None:
        plot_confusion(out.confusion, labels, outputs.confusion_png, title="test confusion matrix")
    tracking.log_metrics(out.metrics, prefix=stage.metrics_prefix)
    tracking.log_outputs(stage.name)
    registry.log_model(outputs.model, registered_name=stage.registered_name, metrics=out.metrics)


def write_responses(records: list[dict], json_path: Path, parquet_path: Path) -> None:
    """Save test-set responses (book ch. 7, "Extracting and saving responses") as JSON (the book's layout plus
    ``model_response``) and as a Parquet table for the evaluation stage, and log them to the active MLflow run
    as a table. The answers themselves come from :func:`gptlab.instruct.generate_responses`."""
    write_json(json_path, records)
    frame = pd.DataFrame.from_records(records)
    atomic_write(parquet_path, lambda tmp: frame.to_parquet(tmp, index=False))
    tracking.mlflow.log_table(data=frame, artifact_file="responses_table.json")
