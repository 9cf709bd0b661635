"""Stage ``base_model`` as a function: the pretrained model or a checkpoint, scored on the corpus."""

from __future__ import annotations

import numpy as np
import pytest
from stage_fixtures import tiny_checkpoint

from gptlab.data import ShardWriter
from stages.base_model import BaseModelParams, base_model


@pytest.fixture
def tokens(tmp_path):
    with ShardWriter(tmp_path / "tokens", vocab_size=50257, tokenizer="gpt2") as w:
        w.add(np.random.default_rng(0).integers(0, 1000, 2000))
        w.finish(val_fraction=0.5)
    return tmp_path / "tokens"


def test_base_model_from_pretrain_and_from_a_checkpoint(tmp_path, tokens) -> None:
    pretrained = tiny_checkpoint(tmp_path / "pretrain")
    model, metrics = base_model(BaseModelParams(eval_batches=2), pretrained, tokens, "cpu")
    assert metrics["source"] == f"pretrain:{pretrained}" and metrics["num_params"] == model.num_params()
    assert 6.0 < metrics["val_loss"] < 12.0  # an untrained model: about ln(50257) = 10.8
    _, other = base_model(
        BaseModelParams(source=str(pretrained), eval_batches=2), tmp_path / "x", tokens, "cpu"
    )
    assert other["source"] == f"checkpoint:{pretrained}" and other["val_loss"] == metrics["val_loss"]


def test_unknown_source_names_the_param(tmp_path, tokens) -> None:
    with pytest.raises(ValueError, match="base_model.source 'gpt5'"):
        base_model(BaseModelParams(source="gpt5"), tmp_path, tokens, "cpu")
