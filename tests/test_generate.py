"""Decoding: greedy/top-k/top-p sampling, EOS, left-padded batches, and KV cache == no cache."""

from __future__ import annotations

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.generate import SamplingConfig, generate, left_pad, sample_next, stream
from gptlab.model import GPT


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_name("gpt-nano", context_length=24, tie_weights=False))
    # Large random weights make a random model's greedy choices vary from step to step.
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.6)
    return m.eval()


PROMPTS = [[5, 17, 99], [1, 2, 3, 4, 5, 6, 7], [200]]


def test_cached_and_uncached_greedy_tokens_identical_and_logits_close(model: GPT) -> None:
    logs: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    outs = {}
    for use_cache in (True, False):
        toks = list(
            stream(
                model,
                PROMPTS,
                max_new_tokens=12,
                use_cache=use_cache,
                on_logits=lambda _, lg, uc=use_cache: logs[uc].append(lg.clone()),
            )
        )
        outs[use_cache] = torch.stack(toks, dim=1)
    assert torch.equal(outs[True], outs[False])
    assert len(set(outs[True][0].tolist())) > 2  # not a degenerate constant stream
    for a, b in zip(logs[True], logs[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cache_holds_what_is_fed_and_logits_are_the_last_positions(model: GPT, monkeypatch) -> None:
    """Generation asks for a cache of prompt + new tokens - 1 positions (the last sampled token is never fed),
    not the whole context window, and for the last position's logits alone, equal to the full forward's."""
    sizes = []
    new_cache = model.new_cache
    monkeypatch.setattr(
        model, "new_cache", lambda *a, **kw: sizes.append(kw["max_length"]) or new_cache(*a, **kw)
    )
    assert len(generate(model, [[5, 17, 99]], max_new_tokens=6)[0]) == 6
    assert sizes == [3 + 6 - 1]
    ids = torch.tensor([[5, 17, 99, 4]])
    with torch.no_grad():
        full, last = model(ids), model(ids, last_only=True)
    assert last.shape == (1, 1, full.size(-1))
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_batched_left_padded_equals_one_by_one(model: GPT) -> None:
    batched = generate(model, PROMPTS, max_new_tokens=10)
    single = [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single


def test_sliding_window_past_context_cache_agrees(model: GPT) -> None:
    # 20-token prompt + 15 new > context 24: the window slides and the cache is rebuilt.
    prompt = [list(range(1, 21))]
    assert generate(model, prompt, max_new_tokens=15) == generate(
        model, prompt, max_new_tokens=15, use_cache=False
    )
    assert len(generate(model, prompt, max_new_tokens=15)[0]) == 15


def test_eos_stops_each_sequence(model: GPT) -> None:
    free = generate(model, PROMPTS, max_new_tokens=10)
    eos = free[0][3]  # a token the first sequence emits at step 4
    out = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
    assert out[0] == free[0][: free[0].index(eos)]
    for got, ref in zip(out, free, strict=True):
        assert got == (ref[: ref.index(eos)] if eos in ref else ref)


def test_sampling_is_reproducible_with_a_generator(model: GPT) -> None:
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, PROMPTS, max_new_tokens=8, sampling=cfg, generator=torch.Generator().manual_seed(1))
    b = generate(model, PROMPTS, max_new_tokens=8, sampling=cfg, generator=torch.Generator().manual_seed(1))
    c = generate(model, PROMPTS, max_new_tokens=8, sampling=cfg, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(4, 50)
    picked = sample_next(logits, SamplingConfig(temperature=2.0, top_k=1), torch.Generator().manual_seed(0))
    assert torch.equal(picked, logits.argmax(-1))


def test_top_p_keeps_smallest_nucleus() -> None:
    # probs 0.5, 0.3, 0.15, 0.05: p=0.7 keeps the first two only.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.7), gen)) for _ in range(300)}
    assert seen == {0, 1}
    seen = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.01), gen)) for _ in range(50)}
    assert seen == {0}


def test_temperature_sampling_follows_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, SamplingConfig(temperature=1.0), gen) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_left_pad_layout() -> None:
    ids, mask = left_pad([[1, 2], [3]], pad_id=9)
    assert ids.tolist() == [[1, 2], [9, 3]]
    assert mask.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[]], pad_id=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_sampling_validation(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)
