"""Stage ``sft``: instruction finetuning (book ch. 7).

Validate the instruction records, split them 85/10/5 (train/test/validation, seeded), tokenize the Alpaca-format
prompt + response, train with the book's collate function (padding targets ignored, optionally the prompt too),
then generate a response for every test record (greedy, KV cache, stop at ``<|endoftext|>``) for the evaluation
stage. The model is registered as ``gptlab-sft``.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.data import ORDERS
from gptlab.fileio import write_json
from gptlab.instruct import ListBatches, collate_sft, encode_record
from gptlab.tokenizer import EOT_ID, encode
from gptlab.train import TrainConfig, lm_loss, train
from stages import tracking
from stages.entry import resolve_device, stage_main
from stages.params import check_choice, load_section
from stages.plots import plot_curves, write_history_csv
from stages.records import load_splits
from stages.responses import generate_responses, write_responses

REGISTERED_NAME = "gptlab-sft"


@dataclass
class SftParams:
    seed: int = 123
    """Seed of the split and batch shuffling."""
    skip_invalid: bool = False
    """Skip (and count) records with missing/empty fields instead of failing."""
    split_shuffle: bool = True
    """Shuffle the records (seeded) before the 85/10/5 split; false splits in file order, as the book's ch. 7."""
    train_frac: float = 0.85
    test_frac: float = 0.10
    mask_prompt: bool = False
    """Exclude the prompt tokens from the loss (the book's exercise 7.2)."""
    max_length: int | None = None
    """Truncate training sequences to this many tokens; None = the model's context length."""
    batch_size: int = 8
    drop_last: bool = False
    """Drop each epoch's last, incomplete training batch (the book's training DataLoaders do)."""
    data_order: str = "seeded"
    """Shuffled order of the training batches (gptlab.data.ORDERS): ``seeded`` or ``torch`` (the book's
    DataLoader)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser settings (``train.epochs`` or ``train.max_steps``)."""
    max_new_tokens: int = 256
    """Response length limit when generating test-set responses."""
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("data_order", self.data_order, ORDERS)


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
    device = resolve_device(params.device)

    with tracking.stage_run("sft", params):
        train_set, test_set, val_set, num_records, skipped = load_splits(
            args.data,
            required=("instruction", "input", "output"),
            skip_invalid=params.skip_invalid,
            train_frac=params.train_frac,
            test_frac=params.test_frac,
            seed=params.seed,
            shuffle=params.split_shuffle,
        )
        model, _ = load_checkpoint(args.base, device=device)
        collate = functools.partial(
            collate_sft,
            pad_id=EOT_ID,
            allowed_max_length=params.max_length or model.config.context_length,
            mask_prompt=params.mask_prompt,
        )
        train_items = [encode_record(e, encode) for e in train_set]
        kw = dict(batch_size=params.batch_size, collate=collate, seed=params.seed, order=params.data_order)
        loader = ListBatches(train_items, drop_last=params.drop_last, **kw)
        train_eval = ListBatches(train_items, drop_last=params.drop_last, **kw)
        val_loader = ListBatches([encode_record(e, encode) for e in val_set], shuffle=False, **kw)
        result = train(
            model,
            loader,
            params.train,
            val_data=val_loader,
            train_eval_data=train_eval,
            loss_fn=lm_loss,
            device=device,
            callback=tracking.metrics_logger(),
        )
        save_checkpoint(model, args.model, meta={"stage": "sft", "prompt_format": "alpaca"})

        responses = generate_responses(
            model, test_set, max_new_tokens=params.max_new_tokens, batch_size=params.batch_size
        )
        rows = [
            {"instruction": e["instruction"], "input": e["input"], "output": e["output"], "model_response": r}
            for e, r in zip(test_set, responses, strict=True)
        ]
        write_responses(rows, args.responses, args.responses_table)
        metrics = {
            "train_loss": result.train_loss,
            "val_loss": result.val_loss,
            "steps": result.step,
            "tokens_per_sec": result.tokens_per_sec,
            "records": num_records,
            "skipped_records": skipped,
            "split_sizes": {"train": len(train_set), "test": len(test_set), "val": len(val_set)},
            "empty_responses": sum(not r for r in responses),
        }
        write_json(args.metrics, metrics)
        write_history_csv(result.history, args.loss_csv, ["train_loss", "val_loss"])
        plot_curves(
            result.history,
            args.loss_png,
            ["train_loss", "val_loss"],
            title="instruction finetuning",
            ylabel="cross-entropy",
        )
        tracking.log_metrics(metrics, prefix="final_")
        for path in (args.metrics, args.loss_csv, args.loss_png, args.responses, args.responses_table):
            tracking.mlflow.log_artifact(str(path))
        tracking.log_model(args.model, registered_name=REGISTERED_NAME, metrics=metrics)
    print(f"sft: val loss {result.val_loss:.3f}, {len(rows)} test responses -> {args.responses}")
    if rows:
        print(f"  e.g. {rows[0]['instruction']!r} -> {rows[0]['model_response']!r}")


if __name__ == "__main__":
    main()
