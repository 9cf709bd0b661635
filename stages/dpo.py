"""Stage ``dpo``: Direct Preference Optimization on top of the SFT model (book ch. 7 bonus; Rafailov et al. 2023).

The policy starts from the ``sft`` checkpoint and a frozen copy is the reference. Loss and log-probabilities
come from :mod:`gptlab.dpo` (summed over response tokens; prompt and padding masked). Logs train/val loss,
chosen/rejected rewards, margins and reward accuracy at every evaluation, then generates test-set responses
from both the reference (SFT) and the policy for the evaluation stage. Registered as ``gptlab-dpo``.
"""

from __future__ import annotations

import argparse
import copy
import functools
from dataclasses import dataclass
from pathlib import Path

from gptlab import lora
from gptlab.batches import ListBatches
from gptlab.dpo import (
    REDUCTIONS,
    collate_preferences,
    evaluate_rewards,
    make_dpo_loss_fn,
    trl_names,
)
from gptlab.errors import UserError
from gptlab.instruct import generate_responses
from gptlab.load import load_checkpoint, load_tokenizer
from gptlab.prompts import Prompter
from gptlab.train import train
from stages.adapters import add_adapters, finish_adapters, parameter_counts
from stages.entry import stage_main
from stages.finetune import FinetuneResult, FinetuneStage, Outputs, RecordsParams, run
from stages.params import check_choice, load_section
from stages.records import load_splits

STAGE = FinetuneStage(
    "dpo",
    registered_name="gptlab-dpo",
    curves=tuple(
        f"{split}_{key}" for key in ("loss", "reward_accuracy", "reward_margin") for split in ("train", "val")
    ),
    title="DPO",
    ylabel="loss / reward",
    metrics_prefix="",
)


@dataclass
class DpoParams(RecordsParams):
    beta: float = 0.1
    """Strength of the KL anchor to the reference model (the book: 0.1)."""
    reduction: str = "sum"
    """Sequence log-probability over response tokens: ``sum`` (the DPO paper) or ``mean`` per token (the
    book's notebook)."""
    mask_prompt: bool = True
    """Score response tokens only (the book masks the prompt)."""

    def __post_init__(self) -> None:
        check_choice("reduction", self.reduction, REDUCTIONS)
        super().__post_init__()
        if self.train.eval_train:
            raise UserError(
                "train.eval_train: the DPO stage measures train loss and rewards itself (train.eval_batches)"
            )


def preference_tune(
    params: DpoParams, sft: Path, data: Path, device: str, *, callback=None
) -> FinetuneResult:
    """DPO on the ``sft`` checkpoint with the ``data`` preference records; test answers of both models (the
    reference's as ``reference_response``). Checkpoint metadata: prompt style, beta, reduction, LoRA settings."""
    parts, num_records, skipped = load_splits(
        data, required=("instruction", "input", "chosen", "rejected"), **params.split_settings()
    )
    train_set, val_set, test_set = parts
    policy, sft_config = load_checkpoint(sft, device=device)
    tokenizer = load_tokenizer(sft)
    # Responses in the format the SFT model was trained on.
    prompter = Prompter(sft_config.get("meta", {}).get("prompt_format", "alpaca"), tokenizer)
    if lora.lora_config(policy):
        lora.merge_lora(policy)  # an SFT saved with separate adapters: fold them in before new ones
    policy.set_dropout(0.0)  # dropout noise would bias log(pi/pi_ref) and the implicit rewards
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if params.lora is not None:
        add_adapters(policy, params.lora)
    collate = functools.partial(
        collate_preferences,
        pad_id=prompter.end_id,
        allowed_max_length=params.max_length or policy.config.context_length,
        mask_prompt=params.mask_prompt,
    )
    encoded = {
        name: [prompter.preference_item(e) for e in rows]
        for name, rows in (("train", train_set), ("val", val_set))
    }
    kw = dict(batch_size=params.batch_size, collate=collate)
    loader = ListBatches(
        encoded["train"], seed=params.train.seed, order=params.data_order, drop_last=params.drop_last, **kw
    )
    scored = {
        "train": ListBatches(encoded["train"], shuffle=False, **kw),
        "val": ListBatches(encoded["val"], shuffle=False, **kw),
    }

    def eval_fn(model) -> dict[str, float]:
        row = {}
        for name, batches in scored.items():
            rewards = evaluate_rewards(
                model,
                reference,
                batches,
                params.beta,
                max_batches=params.train.eval_batches,
                device=device,
                reduction=params.reduction,
            )
            row.update({f"{name}_{k}": v for k, v in rewards.items()})
        return row

    def log(step: int, row: dict[str, float]) -> None:
        if callback is not None:
            callback(step, {**row, **trl_names(row)})

    before = eval_fn(policy)
    result = train(
        policy,
        loader,
        params.train,
        loss_fn=make_dpo_loss_fn(reference, params.beta, params.reduction),
        device=device,
        callback=log,
        eval_fn=eval_fn,
    )
    after = result.history[-1]
    counts = parameter_counts(policy)
    adapters = finish_adapters(policy, params.lora)
    test_rows = [{**e, "output": e.get("output", e["chosen"])} for e in test_set]
    ask = functools.partial(
        generate_responses,
        entries=test_rows,
        prompter=prompter,
        max_new_tokens=params.max_new_tokens,
        batch_size=params.batch_size,
    )
    rows = [
        {
            "instruction": e["instruction"],
            "input": e["input"],
            "output": e["output"],
            "reference_response": ref,
            "model_response": r,
        }
        for e, ref, r in zip(test_rows, ask(reference), ask(policy), strict=True)
    ]
    metrics = {
        **{f"final_{k}": v for k, v in after.items() if k.startswith(("train_", "val_"))},
        **{f"initial_{k}": v for k, v in before.items()},
        "steps": result.step,
        "precision": result.precision,
        **counts,
        "beta": params.beta,
        "records": num_records,
        "skipped_records": skipped,
        "split_sizes": {"train": len(train_set), "test": len(test_set), "val": len(val_set)},
    }
    meta = {
        "stage": "dpo",
        "prompt_format": prompter.style,
        "beta": params.beta,
        "reduction": params.reduction,
        **adapters,
    }
    return FinetuneResult(policy, metrics, result.history, meta, tokenizer, responses=rows)


@stage_main("dpo")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sft", type=Path, required=True, help="the SFT checkpoint (policy init and reference)"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="preference JSON (instruction/input/chosen/rejected)"
    )
    Outputs.add_arguments(parser, responses=True)
    args = parser.parse_args()
    params = load_section("dpo", DpoParams)

    def summary(out: FinetuneResult) -> list[str]:
        m = out.metrics
        return [
            f"train reward accuracy {m['initial_train_reward_accuracy']:.2f} -> {m['final_train_reward_accuracy']:.2f}, "
            f"margin {m['initial_train_reward_margin']:.3f} -> {m['final_train_reward_margin']:.3f} -> {args.model}"
        ]

    run(
        STAGE,
        params,
        lambda device, callback: preference_tune(params, args.sft, args.data, device, callback=callback),
        Outputs.from_args(args),
        summary=summary,
    )


if __name__ == "__main__":
    main()
