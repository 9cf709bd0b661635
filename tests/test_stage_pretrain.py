"""Stage ``pretrain``: an interrupted run resumes from its work directory and ends where an uninterrupted one does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.data import ShardWriter
from gptlab.train import TrainConfig
from stages.pretrain import PretrainParams, pretrain, run_fingerprint


@pytest.fixture
def tokens(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "tokens", vocab_size=50257, tokenizer="gpt2", shard_size=2000) as w:
        w.add(np.tile(rng.integers(0, 500, 64), 80))
        w.finish(val_fraction=0.1)
    return tmp_path / "tokens"


def params(context_length: int = 32, batch_size: int = 4, dropout: float = 0.1, **train) -> PretrainParams:
    """A one-layer gpt-micro run; ``train`` overrides the TrainConfig fields."""
    settings = dict(
        max_steps=8,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=2,
        eval_interval=4,
        eval_batches=2,
        checkpoint_interval=4,
        log_interval=2,
        progress=False,
    )
    return PretrainParams(
        model="gpt-micro",
        model_overrides={"n_layer": 1, "dropout": dropout},
        context_length=context_length,
        batch_size=batch_size,
        train=TrainConfig(**{**settings, **train}),
    )


def test_interrupted_pretrain_resumes_exactly(tokens: Path, tmp_path: Path) -> None:
    reference, ref_result = pretrain(params(), tokens, tmp_path / "ref-work", "cpu")

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 6:  # after the step-4 checkpoint, before the end
            raise Killed

    work = tmp_path / "work"
    with pytest.raises(Killed):
        pretrain(params(), tokens, work, "cpu", callback=kill)
    resumed, result = pretrain(params(), tokens, work, "cpu")
    assert result.step == 8 and result.tokens_seen == ref_result.tokens_seen
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_changed_params_never_resume_a_stale_run(tokens: Path) -> None:
    manifest = {"shards": [{"file": "tokens-00000.arrow", "sha256": "x"}]}
    base = params()
    changed = dataclasses.replace(base, train=dataclasses.replace(base.train, lr=2e-3))
    assert run_fingerprint(base, manifest) == run_fingerprint(params(), manifest)
    assert run_fingerprint(base, manifest) != run_fingerprint(changed, manifest)
    assert run_fingerprint(base, manifest) != run_fingerprint(base, {"shards": []})


@pytest.mark.parametrize(
    ("overrides", "message"), [({"foo": 1}, "unknown GPTConfig field"), ({"dropout": 3.0}, "dropout")]
)
def test_bad_model_overrides_are_named(overrides: dict, message: str) -> None:
    from stages.params import ParamsError
    from stages.pretrain import build_model

    with pytest.raises(ParamsError, match=rf"pretrain\.model_overrides: .*{message}"):
        build_model(dataclasses.replace(params(), model_overrides=overrides))


def test_samples_at_each_evaluation_change_nothing_the_training_computes(
    tokens: Path, tmp_path: Path
) -> None:
    """Dropout is on (0.1): sampling must leave the train mode and torch's RNG as it found them."""
    plain, plain_result = pretrain(params(), tokens, tmp_path / "a", "cpu")
    seen = []
    sampled, result = pretrain(
        params(), tokens, tmp_path / "b", "cpu", on_samples=lambda s, rows: seen.append((s, rows))
    )
    assert [s for s, _ in seen] == [4, 8]
    assert all([r["prompt"] for r in rows] == params().sample_prompts for _, rows in seen)
    assert result.history == [
        {**row, **{k: v for k, v in other.items() if k in ("tokens_per_sec", "peak_memory_mb")}}
        for row, other in zip(plain_result.history, result.history, strict=True)
    ]
    for a, b in zip(plain.state_dict().values(), sampled.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_pretraining_on_the_sample_corpus_learns(tmp_path: Path) -> None:
    """The sample corpus, tokenized by the tokenize stage's function, and 30 steps of a one-layer GPT: both losses
    end well below the uniform guess ln(50257) = 10.8 and the corpus's unigram level."""
    from stages.tokenize import TokenizeParams, tokenize_corpus

    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "corpus.txt"
    tokenize_corpus(sample, tmp_path / "tokens", TokenizeParams(workers=1), window=64, progress=False)
    p = params(
        context_length=64,
        batch_size=8,
        dropout=0.0,
        max_steps=30,
        lr=6e-3,
        min_lr=6e-4,
        eval_interval=30,
        eval_batches=None,
        eval_train=True,
        checkpoint_interval=0,
        log_interval=30,
    )
    _, result = pretrain(p, tmp_path / "tokens", tmp_path / "work", "cpu")
    last = result.history[-1]
    assert last["val_loss"] < 7.0 and last["train_loss"] < 6.0
