"""Stage ``export`` as a function: both exports written, read back by gptlab's importers and compared with the
checkpoint; bad params are named before anything is written."""

from __future__ import annotations

import pytest
from stage_fixtures import tiny_chat_checkpoint, tiny_checkpoint

from stages.export import ExportParams, export_model


def test_gpt2_dpo_model_exports_and_checks_both_formats(tmp_path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "dpo", stage="dpo", prompt_format="alpaca")
    m = export_model(ExportParams(gguf_type="f32"), ckpt, tmp_path / "hf", tmp_path / "m.gguf")
    # float32 both ways: the exports are the checkpoint's weights exactly.
    assert m["hf_max_abs_logit_diff"] == 0.0 and m["gguf_max_abs_logit_diff"] < 1e-5
    assert m["hf_greedy_match"] == m["gguf_greedy_match"] == 1.0
    assert (tmp_path / "hf" / "config.json").is_file() and m["gguf_bytes"] == (
        tmp_path / "m.gguf"
    ).stat().st_size
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert "FROM ./m.gguf" in modelfile and "### Response:" in modelfile


def test_chat_model_q8_0_export_records_the_quantization_error(tmp_path) -> None:
    ckpt = tiny_chat_checkpoint(tmp_path / "dpo", stage="dpo", prompt_format="chat")
    m = export_model(ExportParams(gguf_type="q8_0"), ckpt, tmp_path / "hf", tmp_path / "m.gguf")
    assert m["hf_max_abs_logit_diff"] < 1e-5 and m["hf_greedy_match"] == 1.0
    assert 0.0 < m["gguf_max_abs_logit_diff"] < 0.5  # q8_0 rounds every matrix: close, never exact
    assert "TEMPLATE" in (tmp_path / "m.Modelfile").read_text()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("gguf_type", "q3_k", "export.gguf_type must be one of f32, f16"),
        ("hf_dtype", "int8", "export.hf_dtype must be null or one of float32"),
        ("check_prompts", [], "export.check_prompts must not be empty"),
    ],
)
def test_bad_params_are_named(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        ExportParams(**{field: value})


def test_a_vocabulary_gguf_cannot_carry_gets_the_hf_export_alone(tmp_path) -> None:
    """Gemma 3's SentencePiece-style vocabulary: the HF export is written and checked, the metrics say why no GGUF."""
    import json

    ckpt = tiny_chat_checkpoint(tmp_path / "dpo", stage="dpo", prompt_format="chat")
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["decoder"] = {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "always",
        "split": True,
    }
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    m = export_model(ExportParams(), ckpt, tmp_path / "hf", tmp_path / "m.gguf")
    assert m["gguf"].startswith("not exported:") and "only byte-level BPE" in m["gguf"]
    assert m["hf_greedy_match"] == 1.0 and "gguf_greedy_match" not in m and "gguf_bytes" not in m
    assert not (tmp_path / "m.gguf").exists() and (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_gguf_gptlab_cannot_read_back_is_reported_unchecked(tmp_path) -> None:
    """Llama 3.1+ RoPE scaling goes into llama.cpp's rope_freqs, which gptlab does not import."""
    from test_gguf_write import rope_scaled_llama_checkpoint

    ckpt = rope_scaled_llama_checkpoint(tmp_path / "dpo")
    m = export_model(ExportParams(check_prompts=["hello"]), ckpt, tmp_path / "hf", tmp_path / "m.gguf")
    assert m["gguf"].startswith("exported, not checked") and "rope_freqs" in m["gguf"]
    assert m["hf_greedy_match"] == 1.0 and m["gguf_bytes"] > 0 and "gguf_greedy_match" not in m


def test_the_registered_version_of_the_exported_weights_is_tagged(tmp_path) -> None:
    """Another, newer version (another profile's DPO model, say) is left alone: versions are matched by weights."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from stages import registry
    from stages.export import REGISTERED_NAME, tag_registered_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        ours = tiny_checkpoint(tmp_path / "ours", stage="dpo")
        other = tiny_chat_checkpoint(tmp_path / "other", stage="dpo")
        client = MlflowClient()
        client.create_registered_model(REGISTERED_NAME)
        for checkpoint in (ours, other):
            digest = registry.weights_sha256(checkpoint)
            client.create_model_version(REGISTERED_NAME, str(checkpoint), tags={registry.WEIGHTS_TAG: digest})
        tag_registered_version(ours, "run123", "m.gguf")
        first, second = (client.get_model_version(REGISTERED_NAME, v) for v in ("1", "2"))
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert first.tags["gptlab.export.run_id"] == "run123"
    assert first.tags["gptlab.export.gguf"] == "runs:/run123/gguf/m.gguf"
    assert "gptlab.export.run_id" not in second.tags
