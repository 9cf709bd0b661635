"""LoRA adapters: zero-init, freezing, gradients, merging, errors, config and a tiny training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import GPTConfig
from gptlab.lora import (
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    count_parameters,
    lora_config,
    lora_state_dict,
    mark_trainable,
    merge_lora,
)
from gptlab.model import GPT

# gpt-nano, worked out by hand: n_embd 16, 2 blocks, vocab 256, context 32, biases everywhere, tied head.
#   wte 256*16 = 4096, wpe 32*16 = 512, ln_f 2*16 = 32
#   per block: ln_1 32 + c_attn 16*48+48 = 816 + attn.c_proj 16*16+16 = 272 + ln_2 32
#              + mlp.c_fc 16*64+64 = 1088 + mlp.c_proj 64*16+16 = 1040 = 3280
NANO_TOTAL = 4096 + 512 + 32 + 2 * 3280  # 11200
# LoRA adds rank * (in + out) per wrapped layer: (16+48) + (16+16) + (16+64) + (64+16) = 256 per block.
RANK = 4
NANO_LORA = 2 * RANK * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))  # 2048
HEAD_2 = 16 * 2 + 2  # classifier head: weight + bias, untied (34)


def nano(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("gpt-nano", **overrides)).eval()


def tokens(seed: int = 1, batch: int = 3, length: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


def perturb_lora(model: nn.Module, seed: int = 2) -> None:
    """Give every adapter a nonzero B so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def lora_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def test_fresh_adapter_leaves_outputs_identical() -> None:
    model = nano()
    idx = tokens()
    with torch.no_grad():
        before = model(idx)
    names = apply_lora(model, rank=RANK, alpha=8)
    with torch.no_grad():
        after = model(idx)
    assert torch.equal(before, after)
    assert names == sorted(lora_layers(model))
    assert names == [
        f"transformer.h.{i}.{layer}"
        for i in range(2)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]


def test_forward_matches_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 7)
    layer = LoRALinear.from_linear(base, rank=2, alpha=6)
    perturb_lora(layer)
    x = torch.randn(4, 5)
    expected = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * (6 / 2)
    torch.testing.assert_close(layer(x), expected)
    assert (layer.rank, layer.alpha, layer.scaling) == (2, 6.0, 3.0)
    assert layer.lora_A.shape == (2, 5) and layer.lora_B.shape == (7, 2)
    assert "rank=2" in repr(layer) and "alpha=6" in repr(layer) and "scaling=3" in repr(layer)


def test_from_linear_shares_base_tensors_and_keeps_dtype() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 3, dtype=torch.float64)
    layer = LoRALinear.from_linear(base, rank=2, alpha=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.lora_A.device == base.weight.device
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert isinstance(layer, nn.Linear)

    no_bias = LoRALinear.from_linear(nn.Linear(6, 3, bias=False), rank=1, alpha=1)
    assert no_bias.bias is None and no_bias.merged().bias is None


def test_apply_lora_reuses_model_weights_and_freezes_nothing() -> None:
    model = nano()
    original = model.transformer.h[0].attn.c_attn.weight
    apply_lora(model, rank=RANK, alpha=8)
    assert model.transformer.h[0].attn.c_attn.weight is original
    assert all(p.requires_grad for p in model.parameters())
    assert not isinstance(model.lm_head, LoRALinear)  # tied head is not a default target
    assert count_parameters(model) == (NANO_TOTAL + NANO_LORA, NANO_TOTAL + NANO_LORA)


def test_parameter_counts_by_hand() -> None:
    model = nano()
    assert count_parameters(model) == (NANO_TOTAL, NANO_TOTAL)  # tied head counted once
    assert count_parameters(model) == (model.num_params(), model.num_params())
    apply_lora(model, rank=RANK, alpha=8)
    assert mark_trainable(model) == (NANO_LORA, NANO_TOTAL + NANO_LORA)

    clf = nano(num_classes=2)
    apply_lora(clf, rank=RANK, alpha=8)
    assert mark_trainable(clf, also=("lm_head",)) == (NANO_LORA + HEAD_2, NANO_TOTAL + HEAD_2 + NANO_LORA)
    assert mark_trainable(clf, train_lora=False, also=("lm_head",)) == (
        HEAD_2,
        NANO_TOTAL + HEAD_2 + NANO_LORA,
    )


def test_only_lora_and_head_receive_gradients() -> None:
    model = nano(num_classes=2)
    apply_lora(model, rank=RANK, alpha=8)
    perturb_lora(model)  # with B = 0, lora_A's gradient would be exactly zero
    mark_trainable(model, also=("lm_head",))
    model.train()
    logits = model(tokens())[:, -1, :]
    F.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    for name, p in model.named_parameters():
        trainable = name.endswith((".lora_A", ".lora_B")) or name.startswith("lm_head.")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_mark_trainable_prefixes_are_whole_components() -> None:
    model = nano(n_layer=2)
    apply_lora(model, rank=RANK, alpha=8)
    mark_trainable(model, train_lora=False, also=("transformer.h.1",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.h.1.") for n in trainable)
    assert "transformer.h.1.attn.c_attn.lora_A" in trainable  # `also` covers adapters under the prefix
    with pytest.raises(ValueError, match="transformer.h.9"):
        mark_trainable(model, also=("transformer.h.9",))
    with pytest.raises(ValueError, match="apply_lora"):
        mark_trainable(nano())


def test_merge_after_training_matches_and_restores_plain_model() -> None:
    model = nano(num_classes=2)
    plain_keys = set(model.state_dict())
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    idx = tokens()
    with torch.no_grad():
        untrained = model(idx)
    apply_lora(model, rank=RANK, alpha=8)
    mark_trainable(model, also=("lm_head",))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(idx)[:, -1, :], torch.tensor([0, 1, 1])).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        adapted = model(idx)
    assert not torch.allclose(adapted, untrained, atol=1e-4)
    # The frozen base never moved: only adapters and the head were optimised.
    for k, v in base_before.items():
        assert torch.equal(model.state_dict()[k], v), k

    assert merge_lora(model) is model
    assert lora_layers(model) == []
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert set(model.state_dict()) == plain_keys
    with torch.no_grad():
        torch.testing.assert_close(model(idx), adapted, atol=1e-5, rtol=0)
    assert lora_config(model) is None
    # A merged model loads into a fresh plain GPT of the same config.
    fresh = nano(seed=5, num_classes=2)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), adapted, atol=1e-5, rtol=0)


def test_merged_layer_keeps_frozen_flags_and_dtype() -> None:
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(4, 4, dtype=torch.float64), rank=2, alpha=4)
    perturb_lora(layer)
    layer.weight.requires_grad_(False)
    merged = layer.merged()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float64
    assert not merged.weight.requires_grad and merged.bias.requires_grad
    assert merged.bias is not layer.bias and torch.equal(merged.bias, layer.bias)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(merged(x), layer(x))
    assert merge_lora(layer).weight.shape == (4, 4)  # a bare LoRALinear merges to a new layer


def test_unknown_targets_list_available_names() -> None:
    model = nano()
    with pytest.raises(ValueError, match="q_proj") as info:
        apply_lora(model, rank=RANK, alpha=8, targets=("c_attn", "q_proj"))
    for name in ("c_attn", "c_fc", "c_proj", "lm_head"):
        assert name in str(info.value)
    assert lora_layers(model) == []  # nothing half-applied


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0, "alpha": 8}, "rank"),
        ({"rank": -2, "alpha": 8}, "rank"),
        ({"rank": 2.5, "alpha": 8}, "rank"),
        ({"rank": 4, "alpha": 0}, "alpha"),
        ({"rank": 4, "alpha": 8, "dropout": 1.0}, "dropout"),
        ({"rank": 4, "alpha": 8, "targets": ()}, "targets"),
    ],
)
def test_bad_hyperparameters(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        apply_lora(nano(), **kwargs)


def test_tied_head_is_refused_but_classifier_head_allowed() -> None:
    model = nano()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="tied"):
        apply_lora(model, rank=RANK, alpha=8, targets=("c_attn", "lm_head"))
    assert lora_layers(model) == []

    untied = nano(tie_weights=False)
    assert apply_lora(untied, rank=RANK, alpha=8, targets=("lm_head",)) == ["lm_head"]
    clf = nano(num_classes=2)
    assert apply_lora(clf, rank=RANK, alpha=8, targets=("lm_head",)) == ["lm_head"]


def test_applying_twice_is_refused() -> None:
    model = nano()
    apply_lora(model, rank=RANK, alpha=8)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, rank=RANK, alpha=8, targets=("c_fc",))


def test_lora_config_reports_settings() -> None:
    model = nano()
    assert lora_config(model) is None
    apply_lora(model, rank=RANK, alpha=8, targets=("c_proj", "c_attn"), dropout=0.1)
    expected = {
        "rank": RANK,
        "alpha": 8.0,
        "targets": ["c_attn", "c_proj"],
        "dropout": 0.1,
        "convention": "peft",
    }
    assert lora_config(model) == expected
    apply_lora(model, rank=2, alpha=8, targets=("c_fc",))
    with pytest.raises(ValueError, match="differing"):
        lora_config(model)
    assert LORA_TARGETS == ("c_attn", "c_proj", "c_fc")


def test_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(8, 8), rank=4, alpha=4, dropout=0.5)
    x = torch.randn(16, 8)
    # Fresh adapter: dropout sits on the adapter path only, so even training-mode output equals the base's.
    assert torch.equal(layer.train()(x), F.linear(x, layer.weight, layer.bias))
    perturb_lora(layer)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    no_dropout = LoRALinear.from_linear(nn.Linear(8, 8), rank=4, alpha=4)
    no_dropout.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), no_dropout(x))
    layer.train()
    torch.manual_seed(1)
    first = layer(x)
    assert not torch.allclose(first, layer(x))
    assert not torch.allclose(first, no_dropout(x))


def test_adapter_state_dict_round_trip() -> None:
    model = nano(num_classes=2)
    apply_lora(model, rank=RANK, alpha=8)
    perturb_lora(model)
    keys = set(model.state_dict())
    adapters = lora_state_dict(model, also=("lm_head",))
    assert set(adapters) == {
        k for k in keys if k.endswith((".lora_A", ".lora_B")) or k.startswith("lm_head.")
    }
    assert sum(v.numel() for v in adapters.values()) == NANO_LORA + HEAD_2

    # The base model is rebuilt from its own weights, then the adapters are applied and loaded on top.
    restored = nano(num_classes=2)
    base = {k: v for k, v in model.state_dict().items() if k not in adapters}
    restored.load_state_dict(base, strict=False)
    apply_lora(restored, rank=RANK, alpha=8)
    result = restored.load_state_dict(adapters, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(base)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(restored(idx), model(idx), atol=0, rtol=0)


def test_lora_recovers_a_low_rank_update() -> None:
    """Regression: targets come from W + (a rank-2 ΔW); training only A and B fits them."""
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoRALinear.from_linear(base, rank=2, alpha=2)
    assert mark_trainable(layer) == (2 * (16 + 16), 16 * 16 + 16 + 2 * (16 + 16))
    true_delta = (torch.randn(16, 2) @ torch.randn(2, 16)) * 0.3
    x = torch.randn(64, 16)
    with torch.no_grad():
        y = x @ (base.weight + true_delta).T + base.bias
    weight_before = base.weight.detach().clone()
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=5e-2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-2 * losses[0]
    assert torch.equal(base.weight, weight_before)
    torch.testing.assert_close(layer.merged().weight - base.weight, true_delta, atol=0.05, rtol=0)


def test_lora_only_language_model_training_reduces_loss() -> None:
    model = nano()
    apply_lora(model, rank=RANK, alpha=8)
    assert mark_trainable(model)[0] == NANO_LORA  # adapters only; embeddings and tied head stay frozen
    seq = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
