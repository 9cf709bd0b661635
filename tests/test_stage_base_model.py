"""Stage ``base_model`` as a function: the pretrained model, a checkpoint or a GGUF file, scored on the corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest
from stage_fixtures import tiny_checkpoint
from tiny_gguf import tiny_llama, write_llama_gguf

from gptlab.data import ShardWriter, TokenStream
from stages.base_model import BaseModelParams, base_model, validation_ids


@pytest.fixture
def tokens(tmp_path):
    with ShardWriter(tmp_path / "tokens", vocab_size=50257, tokenizer="gpt2") as w:
        w.add(np.random.default_rng(0).integers(0, 1000, 2000))
        w.finish(val_fraction=0.5)
    return tmp_path / "tokens"


def test_base_model_from_pretrain_and_from_a_checkpoint(tmp_path, tokens) -> None:
    pretrained = tiny_checkpoint(tmp_path / "pretrain")
    model, tokenizer, metrics = base_model(BaseModelParams(eval_batches=2), pretrained, tokens, "cpu")
    assert metrics["source"] == f"pretrain:{pretrained}" and metrics["num_params"] == model.num_params()
    assert 6.0 < metrics["val_loss"] < 12.0  # an untrained model: about ln(50257) = 10.8
    assert tokenizer.name == "gpt2" and metrics["architecture"] == "gpt"
    _, _, other = base_model(
        BaseModelParams(source=str(pretrained), eval_batches=2), tmp_path / "x", tokens, "cpu"
    )
    assert other["source"] == f"checkpoint:{pretrained}" and other["val_loss"] == metrics["val_loss"]


def test_unknown_source_names_the_param(tmp_path, tokens) -> None:
    with pytest.raises(
        ValueError, match="base_model.source 'gpt5': expected 'pretrain', a directory, a .gguf file"
    ):
        base_model(BaseModelParams(source="gpt5"), tmp_path, tokens, "cpu")


def test_base_model_from_a_gguf_file_scores_in_its_own_tokens(tmp_path, tokens) -> None:
    gguf = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf", qtype="Q8_0")
    model, tokenizer, metrics = base_model(
        BaseModelParams(source=str(gguf), eval_batches=None), tmp_path, tokens, "cpu"
    )
    assert metrics["source"] == f"gguf:{gguf}"
    assert (metrics["architecture"], metrics["tokenizer"]) == ("decoder", "hf")
    assert metrics["context_length"] == 128 and metrics["num_params"] == model.num_params()
    ids, num_bytes = validation_ids(tokens, tokenizer)  # the corpus re-tokenized with the model's tokenizer
    assert len(ids) != len(TokenStream(tokens, "val"))
    assert metrics["val_bits_per_byte"] == pytest.approx(
        metrics["val_loss"] / math.log(2) * len(ids) / num_bytes
    )
