"""Stage ``pretrain``: train a GPT from scratch on the token shards (book ch. 5, ``train_model_simple``).

Outputs the checkpoint directory, ``metrics/pretrain.json``, the loss curve (CSV for ``dvc plots`` and a PNG)
and sample generations from fixed prompts. An interrupted run resumes from its work directory, which is keyed
by a hash of the params and the token manifest so a changed run never resumes a stale one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptlab import distributed
from gptlab.batches import ORDERS, WindowLoader
from gptlab.checkpoint import Checkpointer, save_checkpoint
from gptlab.config import GPTConfig
from gptlab.data import TokenStream
from gptlab.errors import UserError
from gptlab.fileio import write_json
from gptlab.generate import SamplingConfig, generate
from gptlab.model import GPT, INIT_SCHEMES
from gptlab.tokenizer import EOT_ID, decode, encode
from gptlab.train import TrainConfig, train
from stages import tracking
from stages.entry import stage_main
from stages.launch import LaunchParams, prepare
from stages.params import ParamsError, check_choice, load_section
from stages.plots import plot_curves, write_history_csv


@dataclass
class PretrainParams:
    model: str = "gpt-mini"
    """Architecture preset (gptlab.config.PRESETS)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """GPTConfig fields to change on the preset (e.g. context_length, dropout, qkv_bias, tie_weights)."""
    init: str = "gpt2"
    """Initial weights (gptlab.model.INIT_SCHEMES): ``gpt2`` (N(0, 0.02), scaled residual projections) or
    ``torch_default`` (PyTorch's layer defaults in the book's ch. 4 order: the book's weights for its seed)."""
    context_length: int = 128
    """Training window length (<= the model's context_length)."""
    stride: int | None = None
    """Window stride; None = context_length (non-overlapping windows, as the book)."""
    batch_size: int = 8
    data_order: str = "seeded"
    """Shuffled order of the windows (gptlab.batches.ORDERS): ``seeded`` (a permutation per epoch from
    ``train.seed``) or ``torch`` (drawn from the global torch RNG as the book's DataLoader does)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchParams = field(default_factory=LaunchParams)
    """Processes and nodes (more than one: data-parallel under ``torchrun``, :mod:`stages.launch`); ``batch_size``
    is the global batch, split across the processes."""
    device: str = "auto"
    sample_prompts: list[str] = field(default_factory=lambda: ["Every effort moves you"])
    sample_max_new_tokens: int = 40
    sample_temperature: float = 0.0
    sample_top_k: int | None = None

    def __post_init__(self) -> None:
        check_choice("init", self.init, INIT_SCHEMES)
        check_choice("data_order", self.data_order, ORDERS)


def build_model(params: PretrainParams) -> GPT:
    overrides = dict(params.model_overrides)
    allowed = {f.name for f in dataclasses.fields(GPTConfig)} - {"name"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ParamsError(
            f"params.yaml: pretrain.model_overrides: unknown GPTConfig field(s) {', '.join(unknown)}"
        )
    try:
        config = GPTConfig.from_name(params.model, **overrides)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params.yaml: pretrain.model_overrides: {exc}") from None
    if params.context_length > config.context_length:
        raise UserError(
            f"pretrain.context_length ({params.context_length}) exceeds the model's context_length ({config.context_length})"
        )
    # The book seeds once, before building the model (torch.manual_seed(123)), and its training draws dropout
    # masks from where the initialisation left that stream (train.reseed: false), so such a run shares the global
    # RNG; one that reseeds for training builds its model in a forked RNG and leaves the caller's untouched.
    with torch.random.fork_rng(devices=[], enabled=params.train.reseed):
        torch.manual_seed(params.train.seed)
        return GPT(config, init=params.init)


def run_fingerprint(params: PretrainParams, manifest: dict) -> str:
    blob = json.dumps([dataclasses.asdict(params), manifest.get("shards")], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrain(params: PretrainParams, tokens: Path, work: Path, device: str, callback=None, on_samples=None):
    """Train (resuming from ``work`` when it holds this exact run); returns (model, TrainResult).

    ``on_samples(step, rows)`` receives the fixed prompts' completions at every evaluation (the book prints a
    sample after each epoch), to follow what the model learns."""
    model = build_model(params)  # first: a bad architecture param is named before the data is read
    train_stream, val_stream = TokenStream(tokens, "train"), TokenStream(tokens, "val")
    kw = dict(
        context_length=params.context_length,
        batch_size=params.batch_size,
        stride=params.stride,
        order=params.data_order,
    )
    train_data = WindowLoader(train_stream, shuffle=True, seed=params.train.seed, **kw)
    # The book's evaluate_model reads the train loader again: a second loader, so training keeps its place.
    train_eval = WindowLoader(train_stream, shuffle=True, seed=params.train.seed, **kw)
    val_data = WindowLoader(val_stream, shuffle=False, drop_last=False, **kw)
    checkpointer = Checkpointer(work, meta={"stage": "pretrain"})

    def log(step: int, metrics: dict[str, float]) -> None:
        if callback is not None:
            callback(step, metrics)
        if on_samples is not None and "val_loss" in metrics:
            on_samples(step, sample(model, params, device))

    result = train(
        model,
        train_data,
        params.train,
        val_data=val_data,
        train_eval_data=train_eval if params.train.eval_train else None,
        device=device,
        checkpointer=checkpointer,
        callback=log,
    )
    return model, result


def sample(model: GPT, params: PretrainParams, device: str) -> list[dict[str, str]]:
    """Completions of the fixed prompts with their own seeded generator; the model's train/eval mode and torch's
    RNG are left as found, so sampling during training changes nothing the training computes."""
    sampling = SamplingConfig(temperature=params.sample_temperature, top_k=params.sample_top_k)
    gen = torch.Generator(device=device).manual_seed(params.train.seed)
    prompts = [encode(p) for p in params.sample_prompts]
    was_training = model.training
    try:
        outs = generate(
            model,
            prompts,
            max_new_tokens=params.sample_max_new_tokens,
            sampling=sampling,
            eos_id=EOT_ID,
            generator=gen,
        )
    finally:
        model.train(was_training)
    return [{"prompt": p, "completion": decode(o)} for p, o in zip(params.sample_prompts, outs, strict=True)]


@stage_main("pretrain")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=Path, required=True, help="shard directory from the tokenize stage")
    parser.add_argument("--model", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--loss-csv", type=Path, required=True)
    parser.add_argument("--loss-png", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="resumable in-progress checkpoints")
    args = parser.parse_args()
    params = load_section("pretrain", PretrainParams)
    device = prepare("pretrain", params.launch, params.device)
    manifest = json.loads((args.tokens / "manifest.json").read_text())
    work = args.work / run_fingerprint(params, manifest)
    if not distributed.is_main():  # train in lockstep with rank 0, which writes everything
        distributed.barrier()  # after rank 0 has cleared other runs' work directories
        pretrain(params, args.tokens, work, device)
        return
    if args.work.is_dir():  # other params' interrupted runs: this run replaces the pipeline's output anyway
        for stale in args.work.iterdir():
            if stale == work:
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink()
    if work.exists():
        print(f"pretrain: resuming from {work}")
    distributed.barrier()

    with tracking.stage_run("pretrain", params):
        model, result = pretrain(
            params,
            args.tokens,
            work,
            device,
            callback=tracking.metrics_logger(),
            on_samples=tracking.log_samples,
        )
        save_checkpoint(model, args.model, meta={"stage": "pretrain", "step": result.step})
        samples = sample(model, params, device)
        write_json(args.samples, samples)
        columns = ["train_loss", "val_loss"]
        write_history_csv(result.history, args.loss_csv, columns)
        plot_curves(result.history, args.loss_png, columns, title="pretraining loss", ylabel="cross-entropy")
        metrics = {
            "train_loss": result.train_loss,
            "val_loss": result.val_loss,
            "val_perplexity": math.exp(min(result.val_loss, 50.0)),
            "steps": result.step,
            "precision": result.precision,
            "processes": distributed.world_size(),
            "tokens_seen": result.tokens_seen,
            "num_params": model.num_params(),
        }
        write_json(args.metrics, metrics)  # results only: equal files mean equal runs
        tracking.log_metrics(metrics, prefix="final_")
        if result.tokens_per_sec is not None:  # timing varies run to run: MLflow only
            tracking.log_metrics({"tokens_per_sec": result.tokens_per_sec})
        tracking.log_outputs("pretrain")
        tracking.mlflow.log_artifacts(str(args.model), artifact_path="model")
    shutil.rmtree(args.work, ignore_errors=True)  # finished: nothing left to resume
    print(f"pretrain: val loss {result.val_loss:.3f} after {result.step} steps -> {args.model}")
    for s in samples:
        print(f"  {s['prompt']!r} -> {s['completion']!r}")


if __name__ == "__main__":
    main()
