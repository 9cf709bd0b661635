"""DPO: hand-computed loss/rewards, sequence log-probs, preference collate/encode, and a tiny training run."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.dpo import (
    collate_preferences,
    dpo_batch_metrics,
    dpo_loss,
    make_dpo_loss_fn,
    sequence_logprobs,
)
from gptlab.model import GPT
from gptlab.prompts import encode_preference, format_input
from gptlab.train import TrainConfig, evaluate, train

LN2 = 0.6931471805599453

# A record in the layout of the book's instruction-data-with-preference.json.
BOOK_RECORD = {
    "instruction": "Evaluate the following phrase by transforming it into the spelling given.",
    "input": "freind --> friend",
    "output": 'The spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".',
    "rejected": 'The spelling of the given phrase "freind" is flat out wrong, get it together, '
    'the correct spelling is "friend".',
    "chosen": 'The spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".',
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: intra-op threads only add sync overhead, which grows to ~100x on a loaded
    CI machine. Restored afterwards so other modules keep the process default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- dpo_loss ---------------------------------------------------------------------------------------------


def test_dpo_loss_single_example_by_hand():
    # logits = 0.1 * ((-1 - -3) - (-2 - -2)) = 0.2; loss = -log sigmoid(0.2) = log(1 + e^-0.2)
    loss, chosen, rejected = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.1)
    assert loss.item() == pytest.approx(0.5981388693815918, abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.1])  # 0.1 * (-1 - -2)
    assert rejected.tolist() == pytest.approx([-0.1])  # 0.1 * (-3 - -2)


def test_dpo_loss_beta_scales_the_margin():
    # logits = 0.5 * 2 = 1.0; loss = log(1 + e^-1)
    loss, chosen, rejected = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.5])
    assert rejected.tolist() == pytest.approx([-0.5])


def test_dpo_loss_batch_is_the_mean_of_per_example_losses():
    # ex 1: 0.1 * ((-1+3) - (-2+2)) = 0.2   -> log(1 + e^-0.2) = 0.5981388693815918
    # ex 2: 0.1 * ((-5+4) - (-5+5)) = -0.1  -> log(1 + e^0.1)  = 0.744396660073571
    # ex 3: 0.1 * ((-2+10) - (-4+6)) = 0.6  -> log(1 + e^-0.6) = 0.4374879504858856
    pc, pr, rc, rr = t(-1, -5, -2), t(-3, -4, -10), t(-2, -5, -4), t(-2, -5, -6)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    expected = (0.5981388693815918 + 0.744396660073571 + 0.4374879504858856) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.1, 0.0, 0.2])  # 0.1 * (pc - rc)
    assert rejected.tolist() == pytest.approx([-0.1, 0.1, -0.4])  # 0.1 * (pr - rr)


def test_dpo_loss_policy_equal_to_reference_is_ln2_with_zero_rewards():
    logp_chosen, logp_rejected = t(-3.5, -12.0), t(-7.25, -1.0)
    loss, chosen, rejected = dpo_loss(logp_chosen, logp_rejected, logp_chosen, logp_rejected, beta=0.3)
    assert loss.item() == pytest.approx(LN2, abs=1e-12)
    assert chosen.tolist() == [0.0, 0.0]
    assert rejected.tolist() == [0.0, 0.0]


def test_dpo_loss_rewards_are_detached_and_loss_has_grad():
    pc = t(-1.0, -2.0).requires_grad_()
    pr = t(-3.0, -1.0).requires_grad_()
    loss, chosen, rejected = dpo_loss(pc, pr, t(-2.0, -2.0), t(-2.0, -2.0))
    assert loss.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    loss.backward()
    # d/d pc of -logsigmoid(beta * z) / B = -beta * sigmoid(-beta * z) / B: pushes chosen log-probs up.
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t(1.0, 2.0), t(1.0), t(1.0), t(1.0))


# --- sequence_logprobs ------------------------------------------------------------------------------------


def test_sequence_logprobs_uniform_logits_give_log_one_over_v_per_counted_token():
    V = 4
    ids = torch.tensor([[0, 1, 2, 3, 0], [3, 3, 3, 0, 0]])
    logits = torch.zeros(2, 5, V)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    out = sequence_logprobs(logits, ids, mask)
    # row 0: positions 1..4 count (position 0 never does): 4 * log(1/4); row 1: only position 2.
    assert out.tolist() == pytest.approx([4 * -1.3862943611198906, -1.3862943611198906])
    assert out.dtype == torch.float32


def test_sequence_logprobs_known_probabilities_and_excluded_positions():
    # V = 3, logits [ln 2, 0, 0] everywhere: p(0) = 2/4 = 0.5, p(1) = p(2) = 0.25.
    logits = torch.tensor([math.log(2.0), 0.0, 0.0]).repeat(1, 5, 1)
    ids = torch.tensor([[2, 0, 1, 0, 2]])
    # position 0 True but never scored; 1 = prompt (False); 2, 3 = response; 4 = padding (False).
    mask = torch.tensor([[True, False, True, True, False]])
    # The padding position's label gets probability 0: excluded positions must not turn the sum into NaN.
    logits[0, 3, 2] = float("-inf")
    out = sequence_logprobs(logits, ids, mask)
    assert out.item() == pytest.approx(-2.0794415416798357)  # ln 0.25 + ln 0.5 = ln 0.125


def test_sequence_logprobs_uses_the_previous_position_logits():
    # Position 0's logits put all mass on token 1, which is what ids[1] is: log-prob 0 there.
    logits = torch.full((1, 3, 3), -1e4)
    logits[0, 0, 1] = 0.0
    logits[0, 1, 2] = math.log(0.5)  # and the other half of the mass on token 0
    logits[0, 1, 0] = math.log(0.5)
    ids = torch.tensor([[0, 1, 2]])
    out = sequence_logprobs(logits, ids, torch.ones(1, 3, dtype=torch.bool))
    assert out.item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_sequence_logprobs_bf16_logits_are_scored_in_float32_and_int_masks_work():
    logits = torch.zeros(1, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = sequence_logprobs(logits, ids, torch.tensor([[0, 1, 1, 0]]))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(2 * math.log(1 / 8), abs=1e-6)
    out.sum().backward()
    assert logits.grad is not None


def test_sequence_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError):
        sequence_logprobs(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5))


# --- collate_preferences ----------------------------------------------------------------------------------

BATCH = [
    {"prompt": [1, 2], "chosen": [1, 2, 3, 4], "rejected": [1, 2, 5]},
    {"prompt": [7], "chosen": [7, 8], "rejected": [7, 9, 9, 9, 9]},
]
F_, T_ = False, True


def test_collate_pads_chosen_and_rejected_to_one_common_length_and_masks_prompt():
    out = collate_preferences(BATCH, pad_id=99)
    assert set(out) == {"chosen", "rejected", "chosen_mask", "rejected_mask"}
    # The longest sequence (rejected of row 1, 5 tokens) sets the length of both chosen and rejected.
    assert out["chosen"].tolist() == [[1, 2, 3, 4, 99], [7, 8, 99, 99, 99]]
    assert out["rejected"].tolist() == [[1, 2, 5, 99, 99], [7, 9, 9, 9, 9]]
    assert out["chosen_mask"].tolist() == [[F_, F_, T_, T_, F_], [F_, T_, F_, F_, F_]]
    assert out["rejected_mask"].tolist() == [[F_, F_, T_, F_, F_], [F_, T_, T_, T_, T_]]
    assert out["chosen"].dtype == torch.long and out["chosen_mask"].dtype == torch.bool


def test_collate_without_prompt_masking_keeps_prompt_tokens():
    out = collate_preferences(BATCH, pad_id=99, mask_prompt=False)
    assert out["chosen_mask"].tolist() == [[T_, T_, T_, T_, F_], [T_, T_, F_, F_, F_]]
    assert out["rejected_mask"].tolist() == [[T_, T_, T_, F_, F_], [T_, T_, T_, T_, T_]]


def test_collate_truncates_ids_and_masks():
    out = collate_preferences(BATCH, pad_id=99, allowed_max_length=3)
    assert out["chosen"].tolist() == [[1, 2, 3], [7, 8, 99]]
    assert out["rejected"].tolist() == [[1, 2, 5], [7, 9, 9]]
    assert out["chosen_mask"].tolist() == [[F_, F_, T_], [F_, T_, F_]]
    assert out["rejected_mask"].tolist() == [[F_, F_, T_], [F_, T_, T_]]
    # A limit above the batch length changes nothing.
    assert collate_preferences(BATCH, pad_id=99, allowed_max_length=50)["chosen"].shape == (2, 5)
    # A limit that leaves a response nothing to score is an error, not a silent 0 (or 0/0 with "mean").
    with pytest.raises(ValueError, match="record 0 of the batch has no chosen response tokens.*max_length"):
        collate_preferences(BATCH, pad_id=99, allowed_max_length=2)


def test_collate_default_pad_is_endoftext_and_padding_is_decided_by_length():
    # A real <|endoftext|> (50256) inside a response still counts; the padding after it does not.
    batch = [{"prompt": [5], "chosen": [5, 50256], "rejected": [5, 6, 7]}]
    out = collate_preferences(batch)
    assert out["chosen"].tolist() == [[5, 50256, 50256]]
    assert out["chosen_mask"].tolist() == [[F_, T_, F_]]


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError):
        collate_preferences([])


# --- encode_preference ------------------------------------------------------------------------------------


def char_encode(text: str) -> list[int]:
    return [ord(c) % 256 for c in text]


def test_encode_preference_with_a_character_tokenizer():
    entry = {"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "No.", "output": "ignored"}
    out = encode_preference(entry, char_encode)
    assert set(out) == {"prompt", "chosen", "rejected", "response_start"}
    prompt = format_input(entry)
    assert out["response_start"] == len(prompt) + 2  # past the blank line, at "### Response:"
    assert "### Input" not in prompt  # empty input: no Input section
    assert out["prompt"] == char_encode(prompt)
    assert out["chosen"] == char_encode(prompt + "\n\n### Response:\nHi!")
    assert out["rejected"] == char_encode(prompt + "\n\n### Response:\nNo.")


def test_encode_preference_rejects_a_tokenizer_that_merges_across_the_boundary():
    def whole_string(text: str) -> list[int]:
        return [len(text)]  # one token per string: the prompt can never be a prefix

    with pytest.raises(ValueError, match="prefix"):
        encode_preference(BOOK_RECORD, whole_string)


def test_encode_preference_missing_key():
    with pytest.raises(ValueError, match="rejected"):
        encode_preference({"instruction": "x", "chosen": "y"}, char_encode)


def test_encode_preference_with_gpt2_bpe(shared_dir):
    from gptlab.tokenizer import decode, encode

    out = encode_preference(BOOK_RECORD, encode)
    prompt_text = format_input(BOOK_RECORD)
    assert out["prompt"] == encode(prompt_text)
    for key in ("chosen", "rejected"):
        assert out[key][: len(out["prompt"])] == out["prompt"]
        assert decode(out[key]) == f"{prompt_text}\n\n### Response:\n{BOOK_RECORD[key]}"
    # "\n\n###" is three BPE tokens ("\n", "\n", "###"): the book masks the prompt + 2 newline tokens
    # and scores the header "### Response:\n" and the answer; so does the collated mask.
    assert out["response_start"] == len(out["prompt"]) + 2
    batch = collate_preferences([out])
    assert int(batch["chosen_mask"].sum()) == len(out["chosen"]) - len(out["prompt"]) - 2
    scored = batch["chosen"][0][batch["chosen_mask"][0]].tolist()
    assert decode(scored) == f"### Response:\n{BOOK_RECORD['chosen']}"


# --- models -----------------------------------------------------------------------------------------------


def tiny_models(dropout: float = 0.0) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    reference = GPT(GPTConfig.from_name("gpt-nano", dropout=dropout))
    return copy.deepcopy(reference), reference


def tiny_batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(n):
        prompt = torch.randint(0, 256, (4,), generator=g).tolist()
        chosen = torch.randint(0, 256, (5,), generator=g).tolist()
        rejected = torch.randint(0, 256, (3,), generator=g).tolist()
        items.append({"prompt": prompt, "chosen": prompt + chosen, "rejected": prompt + rejected})
    return collate_preferences(items, pad_id=0)


def test_identical_policy_and_reference_give_ln2_and_zero_rewards():
    policy, reference = tiny_models()
    m = dpo_batch_metrics(policy, reference, tiny_batch(), beta=0.1)
    assert m["loss"].item() == pytest.approx(LN2, abs=1e-6)
    for key in ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"):
        assert m[key].item() == pytest.approx(0.0, abs=1e-6)
        assert m[key].dim() == 0 and not m[key].requires_grad


def test_batch_metrics_match_separate_forward_passes():
    policy, reference = tiny_models()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = tiny_batch()
    m = dpo_batch_metrics(policy, reference, batch, beta=0.2)
    with torch.no_grad():
        logp = {
            (name, key): sequence_logprobs(model(batch[key]), batch[key], batch[f"{key}_mask"])
            for name, model in (("policy", policy), ("ref", reference))
            for key in ("chosen", "rejected")
        }
    loss, chosen, rejected = dpo_loss(
        logp["policy", "chosen"],
        logp["policy", "rejected"],
        logp["ref", "chosen"],
        logp["ref", "rejected"],
        0.2,
    )
    assert m["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
    assert m["reward_margin"].item() == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert m["reward_accuracy"].item() == pytest.approx((chosen > rejected).float().mean().item())


def test_gradient_flows_through_the_policy_only_and_reference_runs_in_eval_mode():
    policy, reference = tiny_models(dropout=0.1)
    policy.train()
    reference.train()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m = dpo_batch_metrics(policy, reference, tiny_batch(), beta=0.1)
    m["loss"].backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert not reference.training and policy.training


def test_policy_and_reference_must_be_different_modules():
    policy, _ = tiny_models()
    with pytest.raises(ValueError, match="different"):
        dpo_batch_metrics(policy, policy, tiny_batch(), beta=0.1)


def test_a_few_dpo_steps_raise_the_margin_and_lower_the_loss():
    policy, reference = tiny_models()
    ref_state = {k: v.clone() for k, v in reference.state_dict().items()}
    batch = tiny_batch()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    history = []
    for _ in range(15):
        m = dpo_batch_metrics(policy, reference, batch, beta=0.1)
        optimizer.zero_grad()
        m["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in m.items()})
    final = {k: v.item() for k, v in dpo_batch_metrics(policy, reference, batch, beta=0.1).items()}
    assert history[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert history[0]["reward_accuracy"] == 0.0  # rewards tie at 0 before any step
    assert final["loss"] < history[0]["loss"] - 0.1
    assert final["reward_margin"] > 0.5
    assert final["reward_accuracy"] == 1.0
    # The reference is frozen: the optimizer never saw it and nothing else touched it.
    assert all(torch.equal(v, ref_state[k]) for k, v in reference.state_dict().items())


def test_make_dpo_loss_fn_plugs_into_the_training_loop():
    policy, reference = tiny_models()
    batch = tiny_batch()
    loss_fn = make_dpo_loss_fn(reference, beta=0.1)
    assert loss_fn(policy, batch).item() == pytest.approx(LN2, abs=1e-6)
    cfg = TrainConfig(
        max_steps=8,
        lr=1e-2,
        min_lr=1e-2,
        decay="constant",
        weight_decay=0.0,
        eval_interval=0,
        log_interval=1,
        progress=False,
        precision="fp32",
    )
    result = train(policy, [batch], cfg, loss_fn=loss_fn)
    losses = [row["train_loss"] for row in result.history if "train_loss" in row]
    assert losses[0] == pytest.approx(LN2, abs=1e-6)
    assert losses[-1] < losses[0]
    assert evaluate(policy, [batch], loss_fn) < LN2
