"""Stage ``classify``: finetune the base model into a spam classifier (book ch. 6), or, with ``dataset: imdb``,
a movie-review sentiment classifier (the chapter's bonus experiment on the 50k IMDB reviews).

Balance ham/spam by undersampling, split 70/10/20, pad with ``<|endoftext|>``, swap the LM head for a 2-class
head and train the chosen part (``head``, ``last_block`` — the book's default —, ``all`` or ``lora``). Logs
loss/accuracy curves, writes a confusion matrix (PNG + JSON) and per-class precision/recall/F1, and registers
the model as ``gptlab-spam-classifier`` (``gptlab-imdb-classifier``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab import lora
from gptlab.batches import ListBatches
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
from gptlab.fileio import read_utf8
from gptlab.load import load_checkpoint, load_tokenizer
from gptlab.tokenizer import GPT2Tokenizer
from gptlab.train import train
from stages import aclimdb
from stages.adapters import LoraParams, add_adapters, finish_adapters
from stages.entry import stage_log, stage_main
from stages.finetune import FinetuneParams, FinetuneResult, FinetuneStage, Outputs, run
from stages.params import check_choice, load_section


@dataclass(frozen=True)
class Dataset:
    """A labelled text set the stage can train on: its class names (in class-index order) and how it is read."""

    labels: tuple[str, ...]
    registered_name: str
    title: str
    quoted: bool = False
    """Always read with CSV quote rules (the file is written with them)."""


DATASETS = {
    "sms_spam": Dataset(("ham", "spam"), "gptlab-spam-classifier", "spam classifier"),
    "imdb": Dataset(aclimdb.LABELS, "gptlab-imdb-classifier", "IMDB sentiment classifier", quoted=True),
}


def stage_for(dataset: str) -> FinetuneStage:
    spec = DATASETS[dataset]
    return FinetuneStage(
        "classify",
        registered_name=spec.registered_name,
        curves=("train_loss", "val_loss", "train_accuracy", "val_accuracy"),
        title=spec.title,
        ylabel="loss / accuracy",
    )


@dataclass
class ClassifyParams(FinetuneParams):
    dataset: str = "sms_spam"
    """``sms_spam`` (ch. 6: ``data/raw/sms_spam.tsv``) or ``imdb`` (the bonus: ``data/raw/imdb.tsv``, made by a
    download source with ``layout: aclimdb``); dvc.yaml reads ``data/raw/<dataset>.tsv``."""
    max_length: int | None = None
    """Pad/truncate to this many tokens; None = the longest training message (capped at the context)."""
    csv_quoting: bool = False
    """Read the TSV with CSV quote rules, as the book's ``pd.read_csv(sep="\\t")`` does (a message starting
    with a quote runs to the closing quote); false reads one message per line, as the file is written."""
    balance: bool = True
    """Undersample ham to the number of spam messages (the book does)."""
    trainable: str = "last_block"
    """head | last_block | all | lora."""
    head_init: str = "gpt2"
    """The new 2-class head (gptlab.classify.HEAD_INITS): ``gpt2`` (N(0, 0.02)) or ``torch_default``
    (``nn.Linear``'s default, drawn right after ``seed`` as the book's ch. 6)."""
    lora: LoraParams = field(default_factory=LoraParams)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("head_init", self.head_init, HEAD_INITS)
        check_choice("trainable", self.trainable, TRAINABLE)
        check_choice("dataset", self.dataset, tuple(DATASETS))

    @property
    def labels(self) -> tuple[str, ...]:
        return DATASETS[self.dataset].labels


def prepare_splits(text: str, params: ClassifyParams, *, source: str, context_length: int, tokenizer=None):
    """Parse, balance, split and encode (GPT-2's tokenizer unless another is given); returns
    ({split: (ids, labels)}, max_length)."""
    tokenizer = tokenizer or GPT2Tokenizer()
    encode, pad_id = tokenizer.encode, tokenizer.pad_id
    quoting = params.csv_quoting or DATASETS[params.dataset].quoted
    examples = parse_labeled_tsv(text, labels=params.labels, source=source, quoting=quoting)
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
    model, _ = load_checkpoint(base)  # GPT or Decoder, on the CPU: the new weights are drawn there
    # The new head (and the LoRA adapters) are drawn right after seeding with train.seed, as the book's
    # torch.manual_seed(123) before its new out_head.
    if not params.train.reseed:  # training continues this stream, as the book's (it seeds once)
        torch.manual_seed(params.train.seed)
        return _trainable_classifier(model, params).to(device)
    with torch.random.fork_rng(devices=[]):  # training reseeds anyway: the caller's RNGs are left as found
        torch.default_generator.manual_seed(params.train.seed)  # the CPU's alone: the weights are drawn there
        return _trainable_classifier(model, params).to(device)


def _trainable_classifier(model, params: ClassifyParams):
    model = to_classifier(model, len(params.labels), head_init=params.head_init)
    if params.trainable == "lora":
        add_adapters(model, params.lora, also=() if "lm_head" in params.lora.targets else ("lm_head",))
    else:
        set_trainable(model, params.trainable)
    return model


def classify(params: ClassifyParams, base: Path, data: Path, device: str, *, callback=None) -> FinetuneResult:
    """Train the classifier from the ``base`` checkpoint on the ``data`` TSV; no files written. The result
    holds the test split's confusion matrix (``confusion``) and the checkpoint metadata: labels, max_length,
    LoRA settings."""
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
    stage_log("classify").info(
        f"{trainable:,} of {total:,} parameters trainable ({params.trainable}); max_length {max_length}"
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
    cm = confusion_matrix(labels, predict(model, ids).argmax(-1), len(params.labels))
    report = classification_report(cm, params.labels)
    metrics = {
        "train_accuracy": accuracy(model, splits["train"]),
        "val_accuracy": accuracy(model, splits["val"]),
        "test_accuracy": report["accuracy"],
        "test_majority_baseline": majority_baseline(labels, len(params.labels)),
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
        "labels": list(params.labels),
        "max_length": max_length,
        **adapters,
    }
    return FinetuneResult(model, metrics, result.history, meta, tokenizer, confusion=cm.tolist())


@stage_main("classify")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="base model checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="label<TAB>text file")
    Outputs.add_arguments(parser, confusion=True)
    args = parser.parse_args()
    params = load_section("classify", ClassifyParams)
    run(
        stage_for(params.dataset),
        params,
        lambda device, callback: classify(params, args.base, args.data, device, callback=callback),
        Outputs.from_args(args),
        summary=lambda out: [
            f"test accuracy {out.metrics['test_accuracy']:.3f} "
            f"(majority baseline {out.metrics['test_majority_baseline']:.3f}) -> {args.model}"
        ],
    )


if __name__ == "__main__":
    main()
