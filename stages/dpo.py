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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.data import ORDERS
from gptlab.dpo import (
    REDUCTIONS,
    collate_preferences,
    dpo_batch_metrics,
    encode_preference,
    make_dpo_loss_fn,
)
from gptlab.fileio import write_json
from gptlab.instruct import ListBatches
from gptlab.tokenizer import EOT_ID, encode
from gptlab.train import TrainConfig, to_device, train
from stages import tracking
from stages.entry import resolve_device, stage_main
from stages.params import check_choice, load_section
from stages.plots import plot_curves, write_history_csv
from stages.records import load_splits
from stages.responses import generate_responses, write_responses

REGISTERED_NAME = "gptlab-dpo"
REWARD_KEYS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


@dataclass
class DpoParams:
    beta: float = 0.1
    """Strength of the KL anchor to the reference model (the book: 0.1)."""
    reduction: str = "sum"
    """Sequence log-probability over response tokens: ``sum`` (the DPO paper) or ``mean`` per token (the
    book's notebook)."""
    seed: int = 123
    skip_invalid: bool = False
    split_shuffle: bool = True
    """Shuffle the records (seeded) before the 85/10/5 split; false splits in file order, as the book's ch. 7."""
    train_frac: float = 0.85
    test_frac: float = 0.10
    mask_prompt: bool = True
    """Score response tokens only (the book masks the prompt)."""
    max_length: int | None = None
    batch_size: int = 8
    drop_last: bool = False
    """Drop each epoch's last, incomplete training batch (the book's training DataLoaders do)."""
    data_order: str = "seeded"
    """Shuffled order of the training batches (gptlab.data.ORDERS): ``seeded`` or ``torch`` (the book's
    DataLoader)."""
    eval_batches: int | None = 5
    """Train/val batches scored for the reward metrics at each evaluation (None: all)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser settings (``train.epochs`` or ``train.max_steps``)."""
    max_new_tokens: int = 256
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("data_order", self.data_order, ORDERS)
        if self.train.eval_train:
            raise ValueError(
                "train.eval_train: the DPO stage measures train loss and rewards itself (eval_batches)"
            )


@torch.no_grad()
def reward_metrics(
    policy, reference, loader: ListBatches, beta: float, max_batches: int | None, device, reduction: str
) -> dict[str, float]:
    """Mean DPO loss/rewards over up to ``max_batches`` batches, without moving the loader."""
    was_training = policy.training
    policy.eval()
    position = loader.state_dict()
    sums = dict.fromkeys(REWARD_KEYS, 0.0)
    n = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out = dpo_batch_metrics(policy, reference, to_device(batch, device), beta, reduction)
        for k in REWARD_KEYS:
            sums[k] += float(out[k])
        n += 1
    loader.load_state_dict(position)
    policy.train(was_training)
    return {k: v / max(n, 1) for k, v in sums.items()}


@stage_main("dpo")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sft", type=Path, required=True, help="the SFT checkpoint (policy init and reference)"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="preference JSON (instruction/input/chosen/rejected)"
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--curves-csv", type=Path, required=True)
    parser.add_argument("--curves-png", type=Path, required=True)
    parser.add_argument("--responses", type=Path, required=True)
    parser.add_argument("--responses-table", type=Path, required=True)
    args = parser.parse_args()
    params = load_section("dpo", DpoParams)
    device = resolve_device(params.device)

    with tracking.stage_run("dpo", params):
        train_set, test_set, val_set, num_records, skipped = load_splits(
            args.data,
            required=("instruction", "input", "chosen", "rejected"),
            skip_invalid=params.skip_invalid,
            train_frac=params.train_frac,
            test_frac=params.test_frac,
            seed=params.seed,
            shuffle=params.split_shuffle,
        )
        policy, _ = load_checkpoint(args.sft, device=device)
        policy.set_dropout(0.0)  # dropout noise would bias log(pi/pi_ref) and the implicit rewards
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        collate = functools.partial(
            collate_preferences,
            pad_id=EOT_ID,
            allowed_max_length=params.max_length or policy.config.context_length,
            mask_prompt=params.mask_prompt,
        )
        encoded = {
            name: [encode_preference(e, encode) for e in rows]
            for name, rows in (("train", train_set), ("val", val_set))
        }
        loader = ListBatches(
            encoded["train"],
            batch_size=params.batch_size,
            collate=collate,
            seed=params.seed,
            order=params.data_order,
            drop_last=params.drop_last,
        )
        train_eval = ListBatches(
            encoded["train"], batch_size=params.batch_size, collate=collate, shuffle=False
        )
        val_eval = ListBatches(encoded["val"], batch_size=params.batch_size, collate=collate, shuffle=False)

        def eval_fn(model) -> dict[str, float]:
            row = {}
            for name, data in (("train", train_eval), ("val", val_eval)):
                for k, v in reward_metrics(
                    model, reference, data, params.beta, params.eval_batches, device, params.reduction
                ).items():
                    row[f"{name}_{k}"] = v
            return row

        before = eval_fn(policy)
        result = train(
            policy,
            loader,
            params.train,
            loss_fn=make_dpo_loss_fn(reference, params.beta, params.reduction),
            device=device,
            callback=tracking.metrics_logger(),
            eval_fn=eval_fn,
        )
        after = result.history[-1]
        save_checkpoint(
            policy,
            args.model,
            meta={
                "stage": "dpo",
                "prompt_format": "alpaca",
                "beta": params.beta,
                "reduction": params.reduction,
            },
        )

        test_rows = [{**e, "output": e.get("output", e["chosen"])} for e in test_set]
        ref_responses = generate_responses(
            reference, test_rows, max_new_tokens=params.max_new_tokens, desc="reference"
        )
        responses = generate_responses(policy, test_rows, max_new_tokens=params.max_new_tokens, desc="policy")
        rows = [
            {
                "instruction": e["instruction"],
                "input": e["input"],
                "output": e["output"],
                "reference_response": ref,
                "model_response": r,
            }
            for e, ref, r in zip(test_rows, ref_responses, responses, strict=True)
        ]
        write_responses(rows, args.responses, args.responses_table)
        metrics = {
            **{f"final_{k}": v for k, v in after.items() if k.startswith(("train_", "val_"))},
            **{f"initial_{k}": v for k, v in before.items()},
            "steps": result.step,
            "beta": params.beta,
            "records": num_records,
            "skipped_records": skipped,
            "split_sizes": {"train": len(train_set), "test": len(test_set), "val": len(val_set)},
        }
        write_json(args.metrics, metrics)
        columns = [
            "train_loss",
            "val_loss",
            "train_reward_accuracy",
            "val_reward_accuracy",
            "train_reward_margin",
            "val_reward_margin",
        ]
        write_history_csv(result.history, args.curves_csv, columns)
        plot_curves(result.history, args.curves_png, columns, title="DPO", ylabel="loss / reward")
        tracking.log_metrics(metrics)
        for path in (args.metrics, args.curves_csv, args.curves_png, args.responses, args.responses_table):
            tracking.mlflow.log_artifact(str(path))
        tracking.log_model(args.model, registered_name=REGISTERED_NAME, metrics=metrics)
    print(
        f"dpo: train reward accuracy {before['train_reward_accuracy']:.2f} -> {after['train_reward_accuracy']:.2f}, "
        f"margin {before['train_reward_margin']:.3f} -> {after['train_reward_margin']:.3f} -> {args.model}"
    )


if __name__ == "__main__":
    main()
