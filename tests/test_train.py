"""Training loop: schedule, optimizer groups, accumulation, exact resume, NaN guard, callbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gptlab.batches import WindowLoader
from gptlab.checkpoint import Checkpointer
from gptlab.config import GPTConfig
from gptlab.data import ShardWriter, TokenStream
from gptlab.model import GPT
from gptlab.train import (
    NonFiniteLossError,
    TrainConfig,
    configure_optimizer,
    evaluate,
    is_eval_step,
    learning_rate,
    lm_loss,
    train,
)


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    # A learnable stream: a repeating pattern with a little noise.
    base = np.tile(np.arange(40), 60)
    noise = rng.integers(0, 256, size=base.size)
    tokens = np.where(rng.random(base.size) < 0.1, noise, base)
    with ShardWriter(tmp_path / "tokens", vocab_size=256, tokenizer="test", shard_size=700) as w:
        w.add(tokens)
        w.finish(val_fraction=0.2)
    return tmp_path / "tokens"


def loaders(root, seed=0):
    train_data = WindowLoader(TokenStream(root, "train"), context_length=16, batch_size=4, seed=seed)
    val_data = WindowLoader(TokenStream(root, "val"), context_length=16, batch_size=4, shuffle=False)
    return train_data, val_data


def make_model(dropout: float = 0.1) -> GPT:
    torch.manual_seed(42)
    return GPT(GPTConfig.from_name("gpt-nano", context_length=16, dropout=dropout))


def cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=24,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=4,
        eval_interval=8,
        eval_batches=3,
        log_interval=4,
        progress=False,
        seed=7,
        precision="fp32",  # exact comparisons; bf16 has its own test
    )
    return TrainConfig(**{**base, **kw})


def test_learning_rate_schedule_hand_computed() -> None:
    c = TrainConfig(max_steps=10, lr=1.0, min_lr=0.1, warmup_steps=2)
    assert learning_rate(0, c) == pytest.approx(0.5)
    assert learning_rate(1, c) == pytest.approx(1.0)
    assert learning_rate(2, c) == pytest.approx(1.0)  # cosine starts at the peak
    assert learning_rate(6, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(10, c) == pytest.approx(0.1)
    assert learning_rate(5, TrainConfig(max_steps=10, lr=0.3, min_lr=0.0, decay="constant")) == 0.3


def test_optimizer_groups_exclude_biases_norms_embeddings() -> None:
    model = make_model()
    opt = configure_optimizer(model, cfg(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    assert id(model.transformer.wte.weight) not in ids and id(model.transformer.wpe.weight) not in ids
    assert id(model.transformer.h[0].attn.c_attn.weight) in ids
    assert all(p.dim() == 2 for p in decay["params"])
    n_total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_total == model.num_params()  # tied head counted once, nothing missing


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_steps", 0),
        ("decay", "linear"),
        ("precision", "fp8"),
        ("warmup_steps", 99),
        ("min_lr", 1.0),
        ("weight_decay_scope", "some"),
    ],
)
def test_train_config_validation_names_field(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        cfg(**{field: value})


def test_training_reduces_loss_and_reports(shards) -> None:
    train_data, val_data = loaders(shards)
    rows = []
    model = make_model()
    before = evaluate(model, val_data, max_batches=3)
    result = train(
        model, train_data, cfg(max_steps=40), val_data=val_data, callback=lambda s, m: rows.append((s, m))
    )
    assert result.step == 40 and result.val_loss < before - 0.5
    assert result.tokens_seen == 40 * 4 * 16
    assert result.tokens_per_sec > 0
    assert [s for s, _ in rows] == sorted(s for s, _ in rows)
    evals = [m for _, m in rows if "val_loss" in m]
    assert len(evals) == 5 and all(
        m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"])) for m in evals
    )
    assert {"train_loss", "lr", "tokens_seen", "tokens_per_sec"} <= set(rows[0][1])


def test_deterministic_given_seed(shards) -> None:
    results = []
    for _ in range(2):
        train_data, val_data = loaders(shards)
        model = make_model()
        train(model, train_data, cfg(), val_data=val_data)
        results.append(model.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_exact_resume_equals_uninterrupted(shards, tmp_path) -> None:
    train_data, val_data = loaders(shards)
    reference = make_model()
    ref_result = train(reference, train_data, cfg(), val_data=val_data)

    class Killed(Exception):
        pass

    def kill_at_10(step, metrics):
        if step == 12:
            raise Killed

    ck = Checkpointer(tmp_path / "run")
    train_data, val_data = loaders(shards)
    with pytest.raises(Killed):
        train(
            make_model(),
            train_data,
            cfg(checkpoint_interval=10),
            val_data=val_data,
            checkpointer=ck,
            callback=kill_at_10,
        )
    assert ck.load_state()["step"] == 10

    # A fresh process: new model (different init is overwritten), new loaders.
    torch.manual_seed(999)
    resumed = GPT(GPTConfig.from_name("gpt-nano", context_length=16, dropout=0.1))
    train_data, val_data = loaders(shards)
    result = train(resumed, train_data, cfg(checkpoint_interval=10), val_data=val_data, checkpointer=ck)
    assert result.step == 24 and result.tokens_seen == ref_result.tokens_seen
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert result.val_loss == ref_result.val_loss
    assert ck.load_state()["step"] == 24


def test_gradient_accumulation_matches_big_batch(monkeypatch) -> None:
    """Two micro-batches of 2 with accumulation give the gradient of one batch of 4 (no dropout)."""

    class Fixed:
        def __init__(self, batches):
            self.batches, self.pos = batches, 0

        def __iter__(self):
            while self.pos < len(self.batches):
                self.pos += 1
                yield self.batches[self.pos - 1]
            self.pos = 0

        def state_dict(self):
            return {"pos": self.pos}

        def load_state_dict(self, s):
            self.pos = s["pos"]

    grads: list[list[torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    c = dict(max_steps=1, warmup_steps=0, eval_interval=0, grad_clip=None)
    big, small = make_model(dropout=0.0), make_model(dropout=0.0)
    train(big, Fixed([(x, y)]), cfg(**c))
    train(small, Fixed([(x[:2], y[:2]), (x[2:], y[2:])]), cfg(grad_accum_steps=2, **c))
    assert len(grads) == 2
    for g_big, g_small in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g_big, g_small, atol=1e-6, rtol=1e-4)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path) -> None:
    calls = {"n": 0}

    def flaky_loss(model, batch):
        calls["n"] += 1
        loss = lm_loss(model, batch)
        return loss * float("nan") if calls["n"] == 9 else loss

    ck = Checkpointer(tmp_path / "run")
    train_data, val_data = loaders(shards)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 9.*step 5 in .*run"
    ):
        train(make_model(), train_data, cfg(checkpoint_interval=5), loss_fn=flaky_loss, checkpointer=ck)
    state = ck.load_state()
    assert state["step"] == 5
    model = make_model()
    ck.load_weights(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluate_does_not_move_the_loader(shards) -> None:
    _, val_data = loaders(shards)
    model = make_model()
    a = evaluate(model, val_data, max_batches=2)
    b = evaluate(model, val_data, max_batches=2)
    assert a == b


def test_epochs_count_optimizer_steps_with_accumulation(shards) -> None:
    train_data, _ = loaders(shards)
    result = train(
        make_model(), train_data, cfg(max_steps=None, epochs=2, grad_accum_steps=3, warmup_steps=0)
    )
    assert result.step == math.ceil(2 * len(train_data) / 3)


def test_resuming_a_finished_run_reports_its_last_losses(shards, tmp_path) -> None:
    ck = Checkpointer(tmp_path / "run")
    train_data, val_data = loaders(shards)
    done = train(make_model(), train_data, cfg(), val_data=val_data, checkpointer=ck)
    train_data, val_data = loaders(shards)
    again = train(make_model(), train_data, cfg(), val_data=val_data, checkpointer=ck)
    assert again.step == done.step and again.val_loss == done.val_loss and again.train_loss == done.train_loss
    # It trained nothing, so it has no throughput (it used to say 0.0 tokens/s).
    assert done.tokens_per_sec > 0 and again.tokens_per_sec is None


# --- the book's ch. 5 loop (train_model_simple) as options ------------------------------------------------


def test_weight_decay_scope_all_decays_every_parameter_once() -> None:
    model = make_model()
    (group,) = configure_optimizer(model, cfg(weight_decay=0.1, weight_decay_scope="all"), "cpu").param_groups
    assert group["weight_decay"] == 0.1
    assert sum(p.numel() for p in group["params"]) == model.num_params()  # tied head once, norms included


def test_eval_first_evaluates_after_steps_1_6_11_like_global_step_mod_eval_freq(shards) -> None:
    train_data, val_data = loaders(shards)
    rows = []
    train(
        make_model(),
        train_data,
        cfg(max_steps=13, eval_interval=5, eval_first=True),
        val_data=val_data,
        callback=lambda s, m: rows.append(s) if "val_loss" in m else None,
    )
    assert rows == [1, 6, 11, 13]  # the book's global_step 0, 5, 10; gptlab also evaluates the last step
    assert [s for s in range(1, 14) if is_eval_step(s, cfg(eval_interval=5))] == [5, 10]


def test_eval_train_measures_train_loss_in_eval_mode_on_a_fresh_pass(shards) -> None:
    """train_loss at an evaluation is calc_loss_loader over the first eval_batches of the training data."""
    train_data, val_data = loaders(shards)
    train_eval, _ = loaders(shards)
    rows = {}
    model = make_model(dropout=0.5)
    result = train(
        model,
        train_data,
        cfg(max_steps=8, eval_interval=4, eval_train=True),
        val_data=val_data,
        train_eval_data=train_eval,
        callback=lambda s, m: rows.setdefault(s, {}).update(m),
    )
    fresh, _ = loaders(shards)
    assert rows[8]["train_loss"] == pytest.approx(
        evaluate(model, fresh, max_batches=3)
    )  # dropout off, same batches
    assert result.train_loss == rows[8]["train_loss"]
    assert "step_loss" in rows[4] and train_data.position != train_eval.position
    with pytest.raises(ValueError, match="train_eval_data"):
        train(make_model(), train_data, cfg(eval_train=True))


def test_reseed_false_continues_the_callers_rng_stream(shards) -> None:
    def run(seed_before: int) -> torch.Tensor:
        train_data, _ = loaders(shards)
        model = make_model()
        torch.manual_seed(seed_before)
        train(model, train_data, cfg(max_steps=3, warmup_steps=0, reseed=False))
        return model.transformer.wte.weight.detach().clone()

    # With dropout on, the caller's seed now decides the masks (and the reseeding default ignores it).
    assert not torch.equal(run(1), run(2)) and torch.equal(run(1), run(1))


def test_eval_first_needs_periodic_evaluation() -> None:
    with pytest.raises(ValueError, match="eval_first needs eval_interval"):
        cfg(eval_first=True, eval_interval=0)


def test_auto_precision_asks_torch_for_native_bf16(monkeypatch) -> None:
    from gptlab.device import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


def test_bf16_training_is_recorded_and_deterministic(shards) -> None:
    timing = ("tokens_per_sec", "peak_memory_mb", "mfu")

    def results(**kw):
        train_data, val_data = loaders(shards)
        out = train(make_model(), train_data, cfg(max_steps=8, **kw), val_data=val_data)
        return out, [{k: v for k, v in row.items() if k not in timing} for row in out.history]

    (bf16, rows), (_, again) = results(precision="bf16"), results(precision="bf16")
    assert bf16.precision == "bf16" and rows == again
    fp32, _ = results(precision="fp32")
    assert fp32.precision == "fp32" and fp32.val_loss != bf16.val_loss  # autocast did compute in bf16


def test_log_rows_carry_grad_norm_before_clipping_and_mfu(shards, monkeypatch) -> None:
    """The logged gradient norm is the one clipping saw (here it is clipped to 0.1); MFU = FLOPs/token x tok/s /
    peak, with the peak overridable for CPUs."""
    monkeypatch.setenv("GPTLAB_PEAK_TFLOPS", "2.0")
    train_data, val_data = loaders(shards)
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        norms.append(float(real_clip(params, max_norm, *a, **kw)))
        return torch.tensor(norms[-1])

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    model = make_model()
    result = train(model, train_data, cfg(max_steps=4, log_interval=2, grad_clip=0.1), val_data=val_data)
    rows = [r for r in result.history if "grad_norm" in r]
    assert [r["grad_norm"] for r in rows] == [norms[1], norms[3]] and min(norms) > 0.1
    for r in rows:
        assert r["mfu"] == pytest.approx(model.flops_per_token(16) * r["tokens_per_sec"] / 2e12)
        assert r["peak_memory_mb"] > 50
