"""GPT model: shapes, presets, parameter counts, masks, autocast and compile."""

from __future__ import annotations

import pytest
import torch

from gptlab.config import GPT2_PRESETS, PRESETS, GPTConfig
from gptlab.model import GPT


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.from_name("gpt-nano", **overrides)


@pytest.mark.parametrize(
    ("preset", "millions"),
    [("gpt2-small", 124.4), ("gpt2-medium", 354.8), ("gpt2-large", 774.0), ("gpt2-xl", 1557.6)],
)
def test_gpt2_preset_parameter_counts(preset: str, millions: float) -> None:
    # Count analytically on the meta device: no memory is allocated for the 1.5B model.
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(preset))
    assert model.num_params() / 1e6 == pytest.approx(millions, abs=0.1)


def test_presets_are_valid_and_named() -> None:
    for name in PRESETS:
        assert GPTConfig.from_name(name).name == name
    assert set(GPT2_PRESETS) <= set(PRESETS)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd"),
        ({"padded_vocab_size": 10}, "padded_vocab_size"),
        ({"dropout": 1.5}, "dropout"),
        ({"n_layer": 0}, "n_layer"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ValueError, match="gpt2-small"):
        GPTConfig.from_name("gpt5")


def test_forward_shapes_and_weight_tying() -> None:
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 256, (3, 7))
    assert model(idx).shape == (3, 7, 256)
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = GPT(tiny(tie_weights=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == model.num_params() + 256 * 16


def test_padded_vocab_returns_only_real_tokens() -> None:
    model = GPT(tiny(padded_vocab_size=320))
    assert model.transformer.wte.weight.shape == (320, 16)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 256)


def test_classifier_head() -> None:
    model = GPT(tiny(num_classes=2))
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 2)
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 256, (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 256
    torch.testing.assert_close(model(idx)[:, :6], model(changed)[:, :6])


def test_left_padding_mask_matches_unpadded() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    seq = torch.randint(0, 256, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = model(padded, attention_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], model(seq), atol=1e-5, rtol=1e-5)


def test_cache_prefill_then_step_matches_full_forward() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 256, (2, 9))
    cache = model.new_cache(2)
    first = model(idx[:, :5], cache=cache)
    rest = [model(idx[:, t : t + 1], cache=cache) for t in range(5, 9)]
    full = model(idx)
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9


def test_context_overflow_is_a_clear_error() -> None:
    model = GPT(tiny())
    with pytest.raises(ValueError, match="context_length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_flops_per_token_formula() -> None:
    model = GPT(tiny())
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(32) == 6 * n + 12 * 2 * 2 * 8 * 32


def test_dropout_active_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 256, (1, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))


def test_bf16_autocast_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 256, (2, 16))
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(idx)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(idx), model(idx), atol=1e-5, rtol=1e-5)
