"""Stage ``classify``: finetune the base model into a spam classifier (book ch. 6).

Balance ham/spam by undersampling, split 70/10/20, pad with ``<|endoftext|>``, swap the LM head for a 2-class
head and train the chosen part (``head``, ``last_block`` — the book's default —, ``all`` or ``lora``). Logs
loss/accuracy curves, writes a confusion matrix (PNG + JSON) and per-class precision/recall/F1, and registers
the model as ``gptlab-spam-classifier``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptlab import distributed, lora
from gptlab.batches import ORDERS, ListBatches
from gptlab.checkpoint import save_checkpoint
from gptlab.classify import (
    HEAD_INITS,
    TRAINABLE,
    accuracy,
    balance,
    classification_loss,
    classification_report,
    confusion_matrix,
    encode_padded,
    majority_baseline,
    parse_labeled_tsv,
    predict,
    set_trainable,
    split,
    stack_examples,
    to_classifier,
)
from gptlab.errors import UserError
from gptlab.fileio import read_utf8, write_json
from gptlab.load import load_checkpoint, load_tokenizer
from gptlab.model import GPT
from gptlab.tokenizer import GPT2Tokenizer
from gptlab.train import TrainConfig, train
from stages import registry, tracking
from stages.adapters import LoraParams, add_adapters, finish_adapters
from stages.entry import stage_main
from stages.launch import LaunchParams, prepare
from stages.params import check_choice, load_section
from stages.plots import plot_confusion, plot_curves, write_history_csv

LABELS = ("ham", "spam")
REGISTERED_NAME = "gptlab-spam-classifier"


@dataclass
class ClassifyParams:
    csv_quoting: bool = False
    """Read the TSV with CSV quote rules, as the book's ``pd.read_csv(sep="\\t")`` does (a message starting
    with a quote runs to the closing quote); false reads one message per line, as the file is written."""
    balance: bool = True
    """Undersample ham to the number of spam messages (the book does)."""
    max_length: int | None = None
    """Pad/truncate to this many tokens; None = the longest training message (capped at the context)."""
    trainable: str = "last_block"
    """head | last_block | all | lora."""
    head_init: str = "gpt2"
    """The new 2-class head (gptlab.classify.HEAD_INITS): ``gpt2`` (N(0, 0.02)) or ``torch_default``
    (``nn.Linear``'s default, drawn right after ``seed`` as the book's ch. 6)."""
    lora: LoraParams = field(default_factory=LoraParams)
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
        check_choice("head_init", self.head_init, HEAD_INITS)
        check_choice("trainable", self.trainable, TRAINABLE)


def prepare_splits(text: str, params: ClassifyParams, *, source: str, context_length: int, tokenizer=None):
    """Parse, balance, split and encode (GPT-2's tokenizer unless another is given); returns
    ({split: (ids, labels)}, max_length)."""
    tokenizer = tokenizer or GPT2Tokenizer()
    encode, pad_id = tokenizer.encode, tokenizer.pad_id
    examples = parse_labeled_tsv(text, labels=LABELS, source=source, quoting=params.csv_quoting)
    if params.balance:
        examples = balance(examples, seed=params.train.seed)
    splits = split(examples, seed=params.train.seed)._asdict()
    if any(not rows for rows in splits.values()):
        raise UserError(f"{source}: too few messages for a 70/10/20 split ({len(examples)} after balancing)")
    longest = max(len(encode(t)) for _, t in splits["train"])
    max_length = min(params.max_length or longest, context_length)
    tensors = {
        name: (
            encode_padded([t for _, t in rows], encode, max_length=max_length, pad_id=pad_id),
            torch.tensor([y for y, _ in rows], dtype=torch.long),
        )
        for name, rows in splits.items()
    }
    return tensors, max_length


def build_model(base: Path, params: ClassifyParams, device: str):
    model, _ = load_checkpoint(base)  # GPT or Decoder
    # The new head's initialisation: in a forked RNG unless training continues the global stream (reseed: false).
    with torch.random.fork_rng(devices=[], enabled=params.train.reseed):
        torch.manual_seed(params.train.seed)
        model = to_classifier(model, len(LABELS), head_init=params.head_init)
    if params.trainable == "lora":
        add_adapters(model, params.lora, also=() if "lm_head" in params.lora.targets else ("lm_head",))
    else:
        set_trainable(model, params.trainable)
    return model.to(device)


@dataclass
class ClassifyResult:
    model: GPT
    """The trained classifier (adapters merged if ``lora.merge``)."""
    meta: dict
    """Checkpoint metadata: labels, max_length, LoRA settings."""
    metrics: dict
    history: list[dict]
    confusion: list[list[int]]
    """Test-split confusion matrix (rows: true class)."""
    tokenizer: Any = None
    """The base model's tokenizer (saved with the classifier)."""


def classify(params: ClassifyParams, base: Path, data: Path, device: str, *, callback=None) -> ClassifyResult:
    """Train the spam classifier from the ``base`` checkpoint on the ``data`` TSV; no files written."""
    model = build_model(base, params, device)
    tokenizer = load_tokenizer(base)
    splits, max_length = prepare_splits(
        read_utf8(data),
        params,
        source=str(data),
        context_length=model.config.context_length,
        tokenizer=tokenizer,
    )
    trainable, total = lora.count_parameters(model)
    print(
        f"classify: {trainable:,} of {total:,} parameters trainable ({params.trainable}); max_length {max_length}"
    )
    train_items = list(zip(*splits["train"], strict=True))
    kw = dict(
        batch_size=params.batch_size, collate=stack_examples, seed=params.train.seed, order=params.data_order
    )
    result = train(
        model,
        ListBatches(train_items, drop_last=params.drop_last, **kw),
        params.train,
        val_data=ListBatches(list(zip(*splits["val"], strict=True)), shuffle=False, **kw),
        train_eval_data=ListBatches(train_items, drop_last=params.drop_last, **kw),
        loss_fn=classification_loss,
        device=device,
        callback=callback,
        eval_fn=lambda m: {
            "train_accuracy": accuracy(m, splits["train"]),
            "val_accuracy": accuracy(m, splits["val"]),
        },
    )
    adapters = finish_adapters(model, params.lora)
    ids, labels = splits["test"]
    cm = confusion_matrix(labels, predict(model, ids).argmax(-1), len(LABELS))
    report = classification_report(cm, LABELS)
    metrics = {
        "train_accuracy": accuracy(model, splits["train"]),
        "val_accuracy": accuracy(model, splits["val"]),
        "test_accuracy": report["accuracy"],
        "test_majority_baseline": majority_baseline(labels, len(LABELS)),
        "val_loss": result.val_loss,
        "train_loss": result.train_loss,
        "precision": result.precision,
        "split_sizes": {name: len(d[1]) for name, d in splits.items()},
        "max_length": max_length,
        "trainable_params": trainable,
        "total_params": total,
        "test_per_class": report["per_class"],
    }
    meta = {
        "stage": "classify",
        "labels": list(LABELS),
        "max_length": max_length,
        **adapters,
    }
    return ClassifyResult(model, meta, metrics, result.history, cm.tolist(), tokenizer)


@stage_main("classify")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="base model checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="label<TAB>text file")
    parser.add_argument("--model", type=Path, required=True, help="output classifier checkpoint")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--curves-csv", type=Path, required=True)
    parser.add_argument("--curves-png", type=Path, required=True)
    parser.add_argument("--confusion-png", type=Path, required=True)
    parser.add_argument("--confusion-json", type=Path, required=True)
    args = parser.parse_args()
    params = load_section("classify", ClassifyParams)
    device = prepare("classify", params.launch, params.device)
    if not distributed.is_main():  # train in lockstep with rank 0, which writes and logs everything
        classify(params, args.base, args.data, device)
        return

    with tracking.stage_run("classify", params):
        out = classify(params, args.base, args.data, device, callback=tracking.metrics_logger())
        save_checkpoint(out.model, args.model, tokenizer=out.tokenizer, meta=out.meta)
        write_json(args.metrics, out.metrics)
        write_json(args.confusion_json, {"labels": list(LABELS), "matrix": out.confusion, "split": "test"})
        columns = ["train_loss", "val_loss", "train_accuracy", "val_accuracy"]
        write_history_csv(out.history, args.curves_csv, columns)
        plot_curves(out.history, args.curves_png, columns, title="spam classifier", ylabel="loss / accuracy")
        plot_confusion(out.confusion, list(LABELS), args.confusion_png, title="test confusion matrix")
        tracking.log_metrics(out.metrics, prefix="final_")
        tracking.log_outputs("classify")
        registry.log_model(args.model, registered_name=REGISTERED_NAME, metrics=out.metrics)
    m = out.metrics
    print(
        f"classify: test accuracy {m['test_accuracy']:.3f} (majority baseline {m['test_majority_baseline']:.3f}) -> {args.model}"
    )


if __name__ == "__main__":
    main()
