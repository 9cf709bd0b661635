"""Checkpoint directories: round trip, atomic replace, shape/name mismatches named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptlab.checkpoint import CONFIG, WEIGHTS, Checkpointer, CheckpointError, save_checkpoint
from gptlab.config import GPTConfig
from gptlab.load import load_checkpoint
from gptlab.model import GPT


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("gpt-nano", **kw))


def test_round_trip_same_logits_and_config(tmp_path) -> None:
    model = _model(padded_vocab_size=264)
    save_checkpoint(model, tmp_path / "ck", meta={"stage": "test"})
    loaded, config = load_checkpoint(tmp_path / "ck")
    idx = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(loaded(idx), model.eval()(idx), atol=0, rtol=0)
    assert (
        config["tokenizer"] == "gpt2" and config["vocab_size"] == 256 and config["meta"] == {"stage": "test"}
    )
    assert loaded.config == model.config
    # The tied head is stored once and re-tied on load.
    assert "lm_head.weight" not in load_file(str(tmp_path / "ck" / WEIGHTS))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_untied_and_classifier_round_trip(tmp_path) -> None:
    for kw in ({"tie_weights": False}, {"num_classes": 3}):
        model = _model(**kw)
        save_checkpoint(model, tmp_path / "ck")
        loaded, _ = load_checkpoint(tmp_path / "ck")
        torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path) -> None:
    save_checkpoint(_model(), tmp_path / "ck")
    save_checkpoint(_model(n_layer=1), tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck")[0].config.n_layer == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    save_checkpoint(_model(), tmp_path / "ck")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("gptlab.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_model(n_layer=1), tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck")[0].config.n_layer == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_shape_mismatch_names_the_tensor(tmp_path) -> None:
    save_checkpoint(_model(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / CONFIG).read_text())
    cfg["model"]["n_embd"] = 32
    (tmp_path / "ck" / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'transformer\.[\w.]+' has shape \(\d+,?.*\), but the config expects",
    ):
        load_checkpoint(tmp_path / "ck")


def test_missing_and_unexpected_tensors_named(tmp_path) -> None:
    save_checkpoint(_model(), tmp_path / "ck")
    state = load_file(str(tmp_path / "ck" / WEIGHTS))
    state.pop("transformer.ln_f.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "ck" / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"missing transformer\.ln_f\.weight; unexpected extra\.weight"):
        load_checkpoint(tmp_path / "ck")


def test_bad_directories_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG).write_text(
        json.dumps({"format": "gptlab-checkpoint/1", "model": {"n_embd": 7, "n_head": 2}})
    )
    with pytest.raises(CheckpointError, match="divisible"):
        load_checkpoint(tmp_path)


def test_checkpointer_saves_training_state(tmp_path) -> None:
    ck = Checkpointer(tmp_path / "run")
    assert ck.load_state() is None
    model = _model()
    ck.save(model, {"step": 7, "rng": torch.get_rng_state(), "python": (3, (1, 2), None)})
    state = ck.load_state()
    assert state["step"] == 7 and torch.equal(state["rng"], torch.get_rng_state())
    other = GPT(model.config)
    ck.load_weights(other)
    torch.testing.assert_close(other.state_dict(), model.state_dict())
    # A plain model save into the run directory keeps its training state.
    save_checkpoint(model, tmp_path / "run")
    assert ck.load_state()["step"] == 7
