"""Stage ``sft``: instruction finetuning (book ch. 7).

Validate the instruction records, split them 85/10/5 (train/test/validation, seeded), tokenize prompt +
response in the book's Alpaca format or the model's own chat template (``prompt_style``, :mod:`gptlab.prompts`),
train with the book's collate function (padding targets ignored, optionally the prompt too), then generate a
response for every test record (greedy, KV cache, stop at the end token) for the evaluation stage. The model is
registered as ``gptlab-sft``.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab import distributed
from gptlab.batches import ORDERS, ListBatches
from gptlab.checkpoint import save_checkpoint
from gptlab.fileio import write_json
from gptlab.instruct import collate_sft, generate_responses
from gptlab.load import load_checkpoint, load_tokenizer
from gptlab.model import GPT
from gptlab.prompts import STYLES, Prompter
from gptlab.train import TrainConfig, lm_loss, train
from stages import registry, tracking
from stages.adapters import LoraParams, add_adapters, finish_adapters, parameter_counts
from stages.entry import stage_main
from stages.launch import LaunchParams, prepare
from stages.params import check_choice, load_section
from stages.plots import plot_curves, write_history_csv
from stages.records import load_splits
from stages.responses import write_responses

REGISTERED_NAME = "gptlab-sft"


@dataclass
class SftParams:
    skip_invalid: bool = False
    """Skip (and count) records with missing/empty fields instead of failing."""
    split_shuffle: bool = True
    """Shuffle the records (seeded) before the 85/10/5 split; false splits in file order, as the book's ch. 7."""
    train_frac: float = 0.85
    test_frac: float = 0.10
    prompt_style: str = "alpaca"
    """``alpaca`` (the book's prompt format; any model) or ``chat`` (the model's own chat template)."""
    mask_prompt: bool = False
    """Exclude the prompt tokens from the loss (the book's exercise 7.2)."""
    lora: LoraParams | None = None
    """Train LoRA adapters only (appendix E) instead of every weight; None = full finetuning."""
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
    max_new_tokens: int = 256
    """Response length limit when generating test-set responses."""
    launch: LaunchParams = field(default_factory=LaunchParams)
    """Processes and nodes: more than one trains data-parallel under ``torchrun`` (:mod:`stages.launch`);
    ``batch_size`` is the global batch."""
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("data_order", self.data_order, ORDERS)
        check_choice("prompt_style", self.prompt_style, STYLES)


@dataclass
class SftResult:
    model: GPT
    metrics: dict
    history: list[dict]
    responses: list[dict]
    """Test records with the model's answer as ``model_response`` (the book's layout)."""
    tokenizer: Any = None
    meta: dict = field(default_factory=dict)
    """Checkpoint metadata: the prompt style (``gptlab serve`` formats chats with it) and LoRA settings."""


def finetune(params: SftParams, base: Path, data: Path, device: str, *, callback=None) -> SftResult:
    """Instruction-finetune the ``base`` checkpoint on the ``data`` records and answer the test split."""
    parts, num_records, skipped = load_splits(
        data,
        required=("instruction", "input", "output"),
        skip_invalid=params.skip_invalid,
        train_frac=params.train_frac,
        test_frac=params.test_frac,
        seed=params.train.seed,
        shuffle=params.split_shuffle,
    )
    train_set, val_set, test_set = parts
    model, _ = load_checkpoint(base, device=device)
    tokenizer = load_tokenizer(base)
    prompter = Prompter(params.prompt_style, tokenizer)
    if params.lora is not None:
        add_adapters(model, params.lora)
    collate = functools.partial(
        collate_sft,
        pad_id=prompter.end_id,
        allowed_max_length=params.max_length or model.config.context_length,
        mask_prompt=params.mask_prompt,
    )
    train_items = [prompter.sft_item(e) for e in train_set]
    kw = dict(batch_size=params.batch_size, collate=collate, seed=params.train.seed, order=params.data_order)
    result = train(
        model,
        ListBatches(train_items, drop_last=params.drop_last, **kw),
        params.train,
        val_data=ListBatches([prompter.sft_item(e) for e in val_set], shuffle=False, **kw),
        train_eval_data=ListBatches(train_items, drop_last=params.drop_last, **kw),
        loss_fn=lm_loss,
        device=device,
        callback=callback,
    )
    answers = generate_responses(
        model, test_set, prompter, max_new_tokens=params.max_new_tokens, batch_size=params.batch_size
    )
    counts = parameter_counts(model)
    rows = [
        {"instruction": e["instruction"], "input": e["input"], "output": e["output"], "model_response": r}
        for e, r in zip(test_set, answers, strict=True)
    ]
    metrics = {
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "steps": result.step,
        "precision": result.precision,
        **counts,
        "records": num_records,
        "skipped_records": skipped,
        "split_sizes": {"train": len(train_set), "test": len(test_set), "val": len(val_set)},
        "empty_responses": sum(not r for r in answers),
    }
    meta = {"stage": "sft", "prompt_format": params.prompt_style, **finish_adapters(model, params.lora)}
    return SftResult(model, metrics, result.history, rows, tokenizer, meta)


@stage_main("sft")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, required=True, help="instruction JSON (instruction/input/output)"
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--loss-csv", type=Path, required=True)
    parser.add_argument("--loss-png", type=Path, required=True)
    parser.add_argument("--responses", type=Path, required=True, help="test-set responses (JSON)")
    parser.add_argument("--responses-table", type=Path, required=True, help="the same as Parquet")
    args = parser.parse_args()
    params = load_section("sft", SftParams)
    device = prepare("sft", params.launch, params.device)
    if not distributed.is_main():  # train in lockstep with rank 0, which writes and logs everything
        finetune(params, args.base, args.data, device)
        return

    with tracking.stage_run("sft", params):
        out = finetune(params, args.base, args.data, device, callback=tracking.metrics_logger())
        save_checkpoint(out.model, args.model, tokenizer=out.tokenizer, meta=out.meta)
        write_responses(out.responses, args.responses, args.responses_table)
        write_json(args.metrics, out.metrics)
        columns = ["train_loss", "val_loss"]
        write_history_csv(out.history, args.loss_csv, columns)
        plot_curves(
            out.history, args.loss_png, columns, title="instruction finetuning", ylabel="cross-entropy"
        )
        tracking.log_metrics(out.metrics, prefix="final_")
        tracking.log_outputs("sft")
        registry.log_model(args.model, registered_name=REGISTERED_NAME, metrics=out.metrics)
    print(
        f"sft: val loss {out.metrics['val_loss']:.3f}, {len(out.responses)} test responses -> {args.responses}"
    )
    if out.responses:
        print(f"  e.g. {out.responses[0]['instruction']!r} -> {out.responses[0]['model_response']!r}")


if __name__ == "__main__":
    main()
