"""Stage ``classify`` as a function: the book's splits of the sample SMS file, metrics, LoRA adapters merged."""

from __future__ import annotations

import pytest
import torch
from stage_fixtures import SAMPLE, quick_train, tiny_chat_checkpoint, tiny_checkpoint

from gptlab.checkpoint import save_checkpoint
from gptlab.load import load_checkpoint
from gptlab.lora import LoRALinear
from stages.classify import ClassifyParams, LoraParams, classify


def test_classify_trains_and_reports(tmp_path) -> None:
    base = tiny_checkpoint(tmp_path / "base")
    rows = []
    params = ClassifyParams(trainable="last_block", train=quick_train(), batch_size=16)
    out = classify(
        params, base, SAMPLE / "SMSSpamCollection", "cpu", callback=lambda s, m: rows.append((s, m))
    )
    m = out.metrics
    assert m["split_sizes"] == {"train": 281, "val": 40, "test": 81}  # 201 + 201 balanced, 70/10/20
    assert sum(map(sum, out.confusion)) == 81 and set(m["test_per_class"]) == {"ham", "spam"}
    assert 0 < m["trainable_params"] < m["total_params"]  # the last block, the final norm, the head
    assert out.meta["labels"] == ["ham", "spam"] and out.meta["max_length"] == m["max_length"]
    assert [s for s, _ in rows] == [1, 2, 3] and "val_accuracy" in rows[1][1] and "val_accuracy" in rows[2][1]
    assert out.model.config.num_classes == 2


def test_classify_with_lora_on_every_layer_merges_the_adapters(tmp_path) -> None:
    base = tiny_checkpoint(tmp_path / "base")
    lora = LoraParams(rank=2, alpha=2.0, targets=["c_attn", "c_proj", "c_fc", "lm_head"], convention="book")
    params = ClassifyParams(trainable="lora", lora=lora, train=quick_train(max_steps=2))
    out = classify(params, base, SAMPLE / "SMSSpamCollection", "cpu")
    # Adapters only: with lm_head among the targets the head's own weights stay frozen (appendix E).
    (c,) = {n for n, mod in out.model.named_modules() if isinstance(mod, LoRALinear)} or {None}
    assert c is None  # merged: plain linear layers again
    assert out.meta["lora"]["targets"] == ["c_attn", "c_fc", "c_proj", "lm_head"] and out.meta["lora_merged"]
    assert out.metrics["trainable_params"] < out.metrics["total_params"] / 10
    save_checkpoint(out.model, tmp_path / "clf", meta=out.meta)
    assert load_checkpoint(tmp_path / "clf")[0].config.num_classes == 2


def test_classify_a_llama_model_with_lora_on_its_projections(tmp_path) -> None:
    """Any family classifies: the last token's hidden state through a new 2-class head, its own tokenizer."""
    base = tiny_chat_checkpoint(tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    params = ClassifyParams(
        trainable="lora",
        lora=LoraParams(rank=2, alpha=4.0, targets=targets),
        train=quick_train(),
        batch_size=8,
    )
    out = classify(params, base, SAMPLE / "SMSSpamCollection", "cpu")
    assert out.model.config.num_classes == 2 and out.model.lm_head.out_features == 2
    assert out.meta["lora"]["targets"] == sorted(targets)
    assert out.metrics["trainable_params"] < out.metrics["total_params"] / 5
    assert out.tokenizer.name == "hf"  # padded and truncated in the model's own tokens
    save_checkpoint(out.model, tmp_path / "clf", tokenizer=out.tokenizer, meta=out.meta)
    model, _ = load_checkpoint(tmp_path / "clf")
    x = torch.tensor([[5, 70, 80, 90]])
    with torch.no_grad():
        torch.testing.assert_close(model(x), out.model(x))


def test_classifier_beats_the_majority_baseline(tmp_path) -> None:
    """The quality bar the ch. 6 stage must clear: on the held-out test split (81 messages) the classifier beats
    always answering the majority class by more than 20 points."""
    base = tiny_checkpoint(tmp_path / "base")
    train = quick_train(max_steps=None, epochs=2, lr=1e-3, eval_interval=1000)
    out = classify(
        ClassifyParams(trainable="all", train=train, batch_size=8), base, SAMPLE / "SMSSpamCollection", "cpu"
    )
    m = out.metrics
    assert m["test_majority_baseline"] == pytest.approx(42 / 81)  # the larger class: 42 of 81
    assert m["test_accuracy"] > m["test_majority_baseline"] + 0.2
