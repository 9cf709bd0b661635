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
