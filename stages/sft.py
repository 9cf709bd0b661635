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
from dataclasses import dataclass
from pathlib import Path

from gptlab.batches import ListBatches
from gptlab.instruct import collate_sft, generate_responses
from gptlab.load import load_checkpoint, load_tokenizer
from gptlab.prompts import STYLES, Prompter
from gptlab.train import lm_loss, train
from stages.adapters import add_adapters, finish_adapters, parameter_counts
from stages.entry import stage_main
from stages.finetune import FinetuneResult, FinetuneStage, Outputs, RecordsParams, run
from stages.params import check_choice, load_section
from stages.records import load_splits

STAGE = FinetuneStage(
    "sft",
    registered_name="gptlab-sft",
    curves=("train_loss", "val_loss"),
    title="instruction finetuning",
    ylabel="cross-entropy",
)


@dataclass
class SftParams(RecordsParams):
    prompt_style: str = "alpaca"
    """``alpaca`` (the book's prompt format; any model) or ``chat`` (the model's own chat template)."""
    mask_prompt: bool = False
    """Exclude the prompt tokens from the loss (the book's exercise 7.2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("prompt_style", self.prompt_style, STYLES)


def finetune(params: SftParams, base: Path, data: Path, device: str, *, callback=None) -> FinetuneResult:
    """Instruction-finetune the ``base`` checkpoint on the ``data`` records and answer the test split; the
    checkpoint metadata holds the prompt style (``gptlab serve`` formats chats with it) and LoRA settings."""
    parts, num_records, skipped = load_splits(
        data, required=("instruction", "input", "output"), **params.split_settings()
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
    return FinetuneResult(model, metrics, result.history, meta, tokenizer, responses=rows)


@stage_main("sft")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, required=True, help="instruction JSON (instruction/input/output)"
    )
    Outputs.add_arguments(parser, curves="loss", responses=True)
    args = parser.parse_args()
    params = load_section("sft", SftParams)

    def summary(out: FinetuneResult) -> list[str]:
        lines = [
            f"val loss {out.metrics['val_loss']:.3f}, {len(out.responses)} test responses -> {args.responses}"
        ]
        if out.responses:
            lines.append(
                f"  e.g. {out.responses[0]['instruction']!r} -> {out.responses[0]['model_response']!r}"
            )
        return lines

    run(
        STAGE,
        params,
        lambda device, callback: finetune(params, args.base, args.data, device, callback=callback),
        Outputs.from_args(args),
        summary=summary,
    )


if __name__ == "__main__":
    main()
