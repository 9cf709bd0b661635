"""Batches: the window loader of book ch. 2 (windows, seeded shuffling, exact resume) and list batches."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import book_windows, write_stream

from gptlab.batches import ListBatches, WindowLoader
from gptlab.data import TokenStream
from gptlab.instruct import collate_sft


def test_windows_match_book_gptdatasetv1(tmp_path: Path) -> None:
    tokens = list(range(21))
    write_stream(tmp_path, np.array(tokens), val_fraction=0.0, shard_size=5, chunks=[3, 4])
    stream = TokenStream(tmp_path, "train")
    loader = WindowLoader(stream, context_length=4, batch_size=1, stride=2, shuffle=False, drop_last=False)
    xs, ys = book_windows(tokens, 4, 2)
    assert loader.num_windows == len(range(0, 21 - 4, 2)) == len(xs) == 9
    batches = list(loader)
    assert [b[0].tolist()[0] for b in batches] == xs
    assert [b[1].tolist()[0] for b in batches] == ys
    assert batches[0][0].tolist() == [[0, 1, 2, 3]] and batches[0][1].tolist() == [[1, 2, 3, 4]]
    assert batches[1][0].tolist() == [[2, 3, 4, 5]]

    # batched, default stride = context_length (no overlap), drop_last drops the ragged tail
    loader = WindowLoader(stream, context_length=4, batch_size=2, shuffle=False)
    assert loader.num_windows == 5 and len(loader) == 2
    x, y = next(iter(loader))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 4)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_shuffle_deterministic_complete_and_epoch_dependent(tmp_path: Path) -> None:
    write_stream(tmp_path, np.arange(2000) % 50257, val_fraction=0.0)
    stream = TokenStream(tmp_path)

    def epoch_starts(seed: int, epochs: int = 2) -> list[list[int]]:
        loader = WindowLoader(stream, context_length=8, batch_size=7, stride=5, seed=seed, drop_last=False)
        # tokens are their positions, so x[:, 0] is each window's start
        return [[s for x, _ in loader for s in x[:, 0].tolist()] for _ in range(epochs)]

    a0, a1 = epoch_starts(1)
    assert epoch_starts(1) == [a0, a1]
    assert epoch_starts(2)[0] != a0
    assert a0 != a1
    expected = list(range(0, 2000 - 8, 5))
    assert sorted(a0) == sorted(a1) == expected  # each window exactly once per epoch


def test_resume_from_state_dict(tmp_path: Path) -> None:
    write_stream(tmp_path, np.random.default_rng(3).integers(0, 50257, 3000), val_fraction=0.0)
    stream = TokenStream(tmp_path)
    kwargs = {"context_length": 16, "batch_size": 4, "stride": 8, "seed": 7}

    reference = WindowLoader(stream, **kwargs)
    n = len(reference)
    full = [b for _ in range(3) for b in reference]  # three epochs uninterrupted
    assert len(full) == 3 * n

    for k in (0, 5, n - 1, n, n + 3):
        loader = WindowLoader(stream, **kwargs)
        seen = []
        while len(seen) < k:
            for b in loader:
                seen.append(b)
                if len(seen) == k:
                    break
        state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round trip
        assert state["epoch"] == k // n and state["position"] == k % n and state["seed"] == 7

        resumed = WindowLoader(stream, **{**kwargs, "seed": 0})  # state's seed wins
        resumed.load_state_dict(state)
        rest = [b for _ in range(3 - k // n) for b in resumed]
        assert len(seen) + len(rest) == len(full)
        for (x, y), (fx, fy) in zip(seen + rest, full, strict=True):
            assert torch.equal(x, fx) and torch.equal(y, fy)


def test_stale_iterator_is_rejected(tmp_path: Path) -> None:
    write_stream(tmp_path, np.arange(500), val_fraction=0.0)
    loader = WindowLoader(TokenStream(tmp_path), context_length=4, batch_size=2)
    old = iter(loader)
    next(old)
    next(iter(loader))
    with pytest.raises(RuntimeError, match="invalidated"):
        next(old)


def test_too_short_stream(tmp_path: Path) -> None:
    write_stream(tmp_path, np.arange(40), val_fraction=0.5)  # 20 train tokens
    stream = TokenStream(tmp_path, "train")
    with pytest.raises(ValueError, match=r"context_length=20 needs at least 21 tokens.* has 20"):
        WindowLoader(stream, context_length=20, batch_size=1)
    with pytest.raises(ValueError, match=r"batch_size=4 .*needs at least 30 tokens.* has 20"):
        WindowLoader(stream, context_length=8, batch_size=4, stride=7)
    assert len(WindowLoader(stream, context_length=8, batch_size=4, stride=7, drop_last=False)) == 1


# --- ListBatches ---------------------------------------------------------------------------------------------


def epoch_batches(source: ListBatches) -> list[list[int]]:
    return [list(b) for b in source]


def test_list_batches_cover_every_item_once_per_epoch():
    source = ListBatches(range(10), batch_size=3, collate=list, seed=5)
    assert len(source) == 4
    for _ in range(3):
        batches = epoch_batches(source)
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        assert sorted(i for b in batches for i in b) == list(range(10))
    assert source.state_dict()["epoch"] == 3


def test_list_batches_shuffle_is_seeded_and_changes_by_epoch():
    a = ListBatches(range(20), batch_size=4, collate=list, seed=1)
    b = ListBatches(range(20), batch_size=4, collate=list, seed=1)
    a0, a1 = epoch_batches(a), epoch_batches(a)
    assert (a0, a1) == (epoch_batches(b), epoch_batches(b))
    assert a0 != a1
    assert epoch_batches(ListBatches(range(20), batch_size=4, collate=list, seed=2)) != a0
    plain = ListBatches(range(5), batch_size=2, collate=list, shuffle=False)
    assert epoch_batches(plain) == [[0, 1], [2, 3], [4]]


def test_list_batches_drop_last():
    source = ListBatches(range(10), batch_size=3, collate=list, drop_last=True)
    assert len(source) == 3
    batches = epoch_batches(source)
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len({i for b in batches for i in b}) == 9
    with pytest.raises(ValueError, match="drop_last"):
        ListBatches(range(2), batch_size=3, collate=list, drop_last=True)
    assert len(ListBatches(range(2), batch_size=3, collate=list)) == 1


def take(source: ListBatches, k: int) -> list[list[int]]:
    """The next ``k`` batches, crossing epoch boundaries (each ``iter()`` stops at the end of an epoch)."""
    out: list[list[int]] = []
    while len(out) < k:
        for batch in source:
            out.append(list(batch))
            if len(out) == k:
                break
    return out


@pytest.mark.parametrize("k", [0, 1, 4, 5, 7, 14])
def test_list_batches_resume_reproduces_the_rest_exactly(k):
    expected = take(ListBatches(range(13), batch_size=3, collate=list, seed=9), 15)  # 3 epochs x 5 batches

    run = ListBatches(range(13), batch_size=3, collate=list, seed=9)
    done = take(run, k)  # the state is taken while the last batch is still held: it already counts
    state = copy.deepcopy(run.state_dict())

    resumed = ListBatches(range(13), batch_size=3, collate=list, seed=0)
    resumed.load_state_dict(state)  # adopts the saved seed
    assert done + take(resumed, 15 - k) == expected


def test_list_batches_state_checks_and_invalidation():
    source = ListBatches(range(10), batch_size=3, collate=list)
    with pytest.raises(ValueError, match="num_items"):
        ListBatches(range(11), batch_size=3, collate=list).load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        ListBatches(range(10), batch_size=2, collate=list).load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="out of range"):
        source.load_state_dict({"epoch": 0, "position": 5})
    source.load_state_dict({"epoch": 2, "position": 4})  # end of epoch 2 == start of epoch 3
    assert (source.epoch, source.position) == (3, 0)
    old = iter(source)
    next(old)
    iter(source)
    with pytest.raises(RuntimeError, match="invalidated"):
        next(old)
    with pytest.raises(ValueError, match="at least one item"):
        ListBatches([], batch_size=1, collate=list)
    with pytest.raises(ValueError, match="batch_size"):
        ListBatches(range(3), batch_size=0, collate=list)


def test_list_batches_with_collate_sft_feed_training():
    from gptlab.config import GPTConfig
    from gptlab.model import GPT
    from gptlab.train import TrainConfig, lm_loss, train

    items = [([(3 * i + j) % 200 + 1 for j in range(4 + i % 5)], 2) for i in range(12)]
    collate = partial(collate_sft, pad_id=0, allowed_max_length=32, mask_prompt=True)
    source = ListBatches(items, batch_size=4, collate=collate, seed=3)
    x, y = next(iter(ListBatches(items, batch_size=4, collate=collate, seed=3)))
    assert x.shape == y.shape and x.shape[0] == 4

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt-nano"))
    cfg = TrainConfig(max_steps=4, lr=1e-3, min_lr=1e-4, eval_interval=0, progress=False, log_interval=2)
    result = train(model, source, cfg, loss_fn=lm_loss)
    assert result.step == 4
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert source.state_dict()["epoch"] == 1  # 3 batches per epoch, 4 steps
