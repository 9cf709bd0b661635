"""Stage ``dpo`` as a function: reward metrics before and after, TRL's metric names, both models' answers."""

from __future__ import annotations

import math

import pytest
from stage_fixtures import SAMPLE, quick_train, tiny_chat_checkpoint, tiny_checkpoint

from stages.adapters import LoraParams
from stages.dpo import DpoParams, preference_tune


def test_preference_tune_reports_rewards_under_both_names(tmp_path) -> None:
    sft = tiny_checkpoint(tmp_path / "sft", stage="sft", prompt_format="alpaca")
    rows = {}
    params = DpoParams(train=quick_train(lr=1e-3), max_new_tokens=3, reduction="mean")
    out = preference_tune(
        params,
        sft,
        SAMPLE / "instruction-data-with-preference.json",
        "cpu",
        callback=lambda s, m: rows.setdefault(s, {}).update(m),
    )
    m = out.metrics
    assert m["initial_train_reward_accuracy"] == 0.0 and m["initial_train_loss"] == 0.6931471824645996
    assert {"final_train_reward_margin", "final_val_reward_accuracy", "final_train_logps_chosen"} <= set(m)
    last = rows[3]
    assert last["rewards/margins"] == last["train_reward_margin"]
    assert last["eval_rewards/accuracies"] == last["val_reward_accuracy"]
    assert last["logps/chosen"] == last["train_logps_chosen"] < 0
    assert len(out.responses) == m["split_sizes"]["test"] == 10
    assert {"reference_response", "model_response"} <= set(out.responses[0])


def test_lora_dpo_on_a_chat_model_follows_the_sft_prompt_format(tmp_path) -> None:
    """The SFT checkpoint says ``chat``: preference pairs are rendered with the template and end with its end of
    turn; LoRA adapters train while the reference stays the SFT model."""
    sft = tiny_chat_checkpoint(tmp_path / "sft", stage="sft", prompt_format="chat")
    lora = LoraParams(rank=2, alpha=4.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    params = DpoParams(lora=lora, train=quick_train(lr=1e-2), max_new_tokens=3, batch_size=4)
    out = preference_tune(params, sft, SAMPLE / "instruction-data-with-preference.json", "cpu")
    m = out.metrics
    assert out.meta["prompt_format"] == "chat" and out.meta["lora_merged"]
    assert m["trainable_params"] < m["total_params"] / 10
    assert m["initial_train_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert m["final_train_loss"] != m["initial_train_loss"]
    assert len(out.responses) == m["split_sizes"]["test"]


def test_dpo_raises_reward_accuracy_above_chance(tmp_path) -> None:
    """What DPO is for: on its training pairs the policy comes to prefer the chosen answer. At the start the policy
    is the reference (every reward 0, accuracy 0, loss ln 2); after four steps most pairs are ranked right."""
    sft = tiny_checkpoint(tmp_path / "sft", stage="sft", prompt_format="alpaca")
    params = DpoParams(train=quick_train(max_steps=4, lr=1e-3, eval_interval=1000), max_new_tokens=1)
    m = preference_tune(params, sft, SAMPLE / "instruction-data-with-preference.json", "cpu").metrics
    assert m["final_train_reward_accuracy"] > 0.5 > m["initial_train_reward_accuracy"]
    assert m["final_train_reward_margin"] > 0 and m["final_train_loss"] < m["initial_train_loss"]
