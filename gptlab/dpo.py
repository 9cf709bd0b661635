"""Direct Preference Optimization: preference data, sequence log-likelihoods and the DPO loss.

DPO (Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", 2023)
fine-tunes a policy on (prompt, chosen, rejected) triples against a frozen reference model, with no reward
model and no sampling:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))))

Follows the book's ch. 7 bonus notebook "DPO from scratch" (``format_input`` prompts,
``instruction-data-with-preference.json`` records, ``custom_collate_fn`` with response masks,
``compute_dpo_loss``). Sequence log-likelihoods are SUMMED over response tokens by default, as in the paper;
``reduction="mean"`` averages them per token as the notebook's ``compute_logprobs`` does. Rewards are
``beta``-scaled log-ratios as in the paper (the notebook logs them unscaled).

The module does no file I/O; :func:`make_dpo_loss_fn` plugs DPO into :func:`gptlab.train.train`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import UserError
from gptlab.prompts import PREFERENCE_KEYS
from gptlab.train import to_device

REDUCTIONS = ("sum", "mean")


def collate_preferences(
    batch: list[dict],
    *,
    pad_id: int = 50256,
    allowed_max_length: int | None = None,
    mask_prompt: bool = True,
) -> dict[str, torch.Tensor]:
    """Pad encoded preference records (from :func:`gptlab.prompts.encode_preference`) into one batch (book's DPO collate).

    ``chosen`` and ``rejected`` are right-padded with ``pad_id`` to ONE common length, the longest sequence of
    either kind, so a caller can run both through the model as a single (2B, T) batch. ``chosen_mask`` /
    ``rejected_mask`` (bool, B × T) are True on response tokens: False on padding (decided by length, so a
    ``pad_id`` that is also a real token such as ``<|endoftext|>`` is still counted where it is real) and, with
    ``mask_prompt``, on the prompt and the blank line after it, up to ``response_start`` (the book's
    ``mask[:prompt.shape[0] + 2] = False``); the ``### Response:`` header stays scored, as in the book.
    ``allowed_max_length`` truncates ids and masks. Unlike the book, no extra padding column is added (it is
    masked out there anyway).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if allowed_max_length is not None and allowed_max_length <= 0:
        raise UserError(f"allowed_max_length must be > 0, got {allowed_max_length}")
    length = max(len(item[key]) for item in batch for key in PREFERENCE_KEYS)
    out: dict[str, torch.Tensor] = {}
    for key in PREFERENCE_KEYS:
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for i, item in enumerate(batch):
            seq = item[key]
            ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            start = item.get("response_start", len(item["prompt"])) if mask_prompt else 0
            mask[i, start : len(seq)] = True
        if allowed_max_length is not None:
            ids, mask = ids[:, :allowed_max_length], mask[:, :allowed_max_length]
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            i = empty[0]
            raise UserError(
                f"preference record {i} of the batch has no {key} response tokens to score (prompt of "
                f"{len(batch[i]['prompt'])} tokens, allowed_max_length={allowed_max_length}): raise max_length"
            )
        out[key], out[f"{key}_mask"] = ids.contiguous(), mask.contiguous()
    return out


def sequence_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Log-likelihood of the masked tokens of each sequence, (B,).

    ``logits`` (B, T, V) are ``model(input_ids)``; token ``t`` is scored by the logits at ``t - 1``, so the
    first position never counts, and ``mask[:, t]`` decides whether token ``t`` counts. ``sum`` is the DPO
    paper's ``log pi(y|x)``; ``mean`` divides by the number of scored tokens, as the book's DPO notebook
    (``compute_logprobs``), which drops the likelihood's dependence on length. Computed in float32 so bf16
    logits under autocast do not lose precision in the normaliser.
    """
    if reduction not in REDUCTIONS:
        raise UserError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or mask.shape != input_ids.shape:
        raise UserError(
            f"expected logits (B, T, V) with input_ids and mask (B, T); got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(mask.shape)}"
        )
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:].unsqueeze(-1)
    # gather - logsumexp == log_softmax at the label, without materialising a second (B, T, V) tensor.
    token_logp = logits.gather(-1, labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    # where, not multiply: a -inf log-prob at a masked position must not turn the sum into NaN.
    scored = mask[:, 1:].bool()
    total = torch.where(scored, token_logp, 0.0).sum(-1)
    return total if reduction == "sum" else total / scored.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss from sequence log-probs (each (B,)); returns ``(loss, chosen_rewards, rejected_rewards)``.

    ``loss = mean(-logsigmoid(beta * ((pc - pr) - (rc - rr))))`` (Rafailov et al. 2023, eq. 7). The implicit
    rewards ``beta * (pc - rc)`` and ``beta * (pr - rr)`` are per example and detached: they are for logging.
    """
    shape = policy_chosen.shape
    if any(t.shape != shape for t in (policy_rejected, ref_chosen, ref_rejected)):
        raise ValueError("policy/reference chosen/rejected log-probs must all have the same shape")
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    # logsigmoid is the stable form of log(sigmoid(x)) for large |x|.
    loss = -F.logsigmoid(beta * logits).mean()
    chosen_rewards = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (policy_rejected - ref_rejected)).detach()
    return loss, chosen_rewards, rejected_rewards


def _pair_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of chosen and rejected from ONE forward pass over the stacked (2B, T) batch."""
    ids = torch.cat([batch["chosen"], batch["rejected"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    # Right padding needs no attention mask: causal attention never lets a real token see later padding.
    logp = sequence_logprobs(model(ids), ids, mask, reduction)
    return logp.chunk(2)


def dpo_batch_metrics(
    policy: nn.Module,
    reference: nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float,
    reduction: str = "sum",
) -> dict[str, torch.Tensor]:
    """DPO loss (with grad through ``policy`` only) and batch-mean reward metrics for a collated batch.

    The reference runs under ``torch.no_grad()`` and is put in eval mode (it is a fixed distribution, so no
    dropout); the policy keeps whatever mode the caller set. Returns ``loss``, ``chosen_reward``,
    ``rejected_reward``, ``reward_margin`` (chosen - rejected), the policy's mean ``logps_chosen`` and
    ``logps_rejected``, and ``reward_accuracy`` (fraction of pairs with
    chosen reward > rejected reward), the last four detached scalars.
    """
    if policy is reference:
        raise ValueError("policy and reference must be different modules (copy the model for the reference)")
    policy_chosen, policy_rejected = _pair_logprobs(policy, batch, reduction)
    reference.eval()
    with torch.no_grad():
        ref_chosen, ref_rejected = _pair_logprobs(reference, batch, reduction)
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    )
    return {
        "loss": loss,
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps_chosen": policy_chosen.detach().mean(),
        "logps_rejected": policy_rejected.detach().mean(),
    }


REWARD_KEYS = (
    "loss",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "reward_accuracy",
    "logps_chosen",
    "logps_rejected",
)
# The names Hugging Face TRL's DPOTrainer logs, so runs of both line up (TRL prefixes evaluation with "eval_").
TRL_NAMES = {
    "chosen_reward": "rewards/chosen",
    "rejected_reward": "rewards/rejected",
    "reward_accuracy": "rewards/accuracies",
    "reward_margin": "rewards/margins",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}


def trl_names(row: dict[str, float]) -> dict[str, float]:
    """``train_<key>``/``val_<key>`` metrics of :func:`evaluate_rewards` under TRL's names (``rewards/chosen``,
    ``eval_rewards/chosen``, ...)."""
    out = {}
    for key, value in row.items():
        split, _, name = key.partition("_")
        if split in ("train", "val") and name in TRL_NAMES:
            out[("eval_" if split == "val" else "") + TRL_NAMES[name]] = value
    return out


@torch.no_grad()
def evaluate_rewards(
    policy: nn.Module,
    reference: nn.Module,
    batches,
    beta: float,
    *,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    reduction: str = "sum",
) -> dict[str, float]:
    """Mean DPO loss and reward metrics (:data:`REWARD_KEYS`) over up to ``max_batches`` collated batches, in eval
    mode; a resumable batch source is left where it was (the book's ``evaluate_dpo_loss_loader``)."""
    was_training = policy.training
    policy.eval()
    position = batches.state_dict() if hasattr(batches, "state_dict") else None
    sums = dict.fromkeys(REWARD_KEYS, 0.0)
    n = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            out = dpo_batch_metrics(policy, reference, to_device(batch, device), beta, reduction)
            for key in REWARD_KEYS:
                sums[key] += float(out[key])
            n += 1
    finally:
        if position is not None:
            batches.load_state_dict(position)
        policy.train(was_training)
    return {k: v / max(n, 1) for k, v in sums.items()}


def make_dpo_loss_fn(
    reference: nn.Module, beta: float, reduction: str = "sum"
) -> Callable[[nn.Module, dict], torch.Tensor]:
    """``loss_fn(policy, batch)`` for :func:`gptlab.train.train` / :func:`gptlab.train.evaluate`.

    ``train`` moves the policy and the batch to its device but knows nothing of the reference, so the reference
    follows the batch's device on first use (and whenever that changes).
    """

    def loss_fn(policy: nn.Module, batch: dict) -> torch.Tensor:
        device = batch["chosen"].device
        param = next(reference.parameters(), None)
        if param is not None and param.device != device:
            reference.to(device)
        return dpo_batch_metrics(policy, reference, batch, beta, reduction)["loss"]

    return loss_fn
