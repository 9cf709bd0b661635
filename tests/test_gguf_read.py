"""GGUF import (:mod:`gptlab.formats.gguf_read`) against ``transformers`` loading the same file (``gguf_file=``).

Tiny Llama GGUF files are written with the ``gguf`` package's writer as llama.cpp writes them (its names, its
interleaved query/key rows, F32 norms), the matrices stored in each supported type; both readers dequantize
through the ``gguf`` package, so the logits must agree to float32 rounding and greedy tokens exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_gguf import tiny_llama, write_llama_gguf
from transformers import AutoModelForCausalLM

from gptlab.checkpoint import read_config
from gptlab.cli import main as cli_main
from gptlab.formats.gguf_read import GGUFImportError, _reader, _unpermute, hf_name, load_gguf, read_metadata
from gptlab.generate import generate
from gptlab.load import load_checkpoint, load_tokenizer

IDS = torch.tensor(
    [[5, 70, 80, 90, 100, 3, 200, 7, 9, 260, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """qtype -> (the transformers model written, the GGUF path); one directory per file for ``gguf_file=``."""
    out = {}
    for qtype in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"):
        hf = tiny_llama(seed=len(out))
        out[qtype] = (hf, write_llama_gguf(hf, tmp_path_factory.mktemp(qtype) / "tiny.gguf", qtype=qtype))
    return out


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_logits_and_greedy_tokens_equal_transformers_reading_the_same_file(files, qtype) -> None:
    _, path = files[qtype]
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model, _ = load_gguf(path)
    with torch.no_grad():
        want = ref(IDS).logits
        got = model(IDS)
    assert want.abs().max() > 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    prompt = IDS[0].tolist()
    with torch.no_grad():
        tokens = ref.generate(
            IDS[:1], attention_mask=torch.ones_like(IDS[:1]), do_sample=False, max_new_tokens=8
        )
    want_tokens = tokens[0, len(prompt) :].tolist()
    assert generate(model, [prompt], max_new_tokens=8, use_cache=True) == [want_tokens]
    assert generate(model, [prompt], max_new_tokens=8, use_cache=False) == [want_tokens]


def test_quantized_weights_are_close_to_the_originals(files) -> None:
    """The dequantized matrices are the written ones up to each type's rounding (K types hold random blocks)."""
    errors = {}
    for qtype in ("F32", "F16", "BF16", "Q8_0", "Q4_0"):
        hf, path = files[qtype]
        model, _ = load_gguf(path)
        key = "model.layers.0.self_attn.q_proj.weight"
        want = hf.state_dict()[key]
        errors[qtype] = ((model.state_dict()[key] - want).abs().max() / want.abs().max()).item()
    assert errors["F32"] == 0.0
    assert errors["F16"] < 1e-3 and errors["BF16"] < 1e-2 and errors["Q8_0"] < 2e-2 and errors["Q4_0"] < 0.2


def test_untied_output_head(tmp_path) -> None:
    hf = tiny_llama(tie=False, seed=7)
    path = write_llama_gguf(hf, tmp_path / "untied.gguf")
    model, _ = load_gguf(path)
    assert not model.config.tie_weights
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-4, rtol=1e-4)


def test_unpermute_inverts_llama_cpp_interleaving() -> None:
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of 4 rows
    interleaved = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)  # llama.cpp's converter
    np.testing.assert_array_equal(_unpermute(interleaved, 2), w)
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.3.ffn_norm.weight", "gemma3") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert hf_name("rope_freqs.weight") is None


def test_cli_import_writes_a_checkpoint_with_the_tokenizer(files, tmp_path, capsys) -> None:
    hf, path = files["Q8_0"]
    assert cli_main(["import", str(path), str(tmp_path / "ck")]) == 0
    config = read_config(tmp_path / "ck")
    assert (config["architecture"], config["tokenizer"]) == ("decoder", "hf")
    model, _ = load_checkpoint(tmp_path / "ck")
    direct, tokenizer = load_gguf(path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), direct(IDS), atol=0, rtol=0)
    saved = load_tokenizer(tmp_path / "ck")
    text = "Hello the world! <|im_start|>user\n12 in at<|im_end|>"
    assert saved.encode(text) == tokenizer.encode(text)
    assert saved.chat_template == tokenizer.chat_template and saved.stop_ids == tokenizer.stop_ids


def _write(tmp_path, arch: str = "llama", tensors=(), **keys):
    import gguf

    path = tmp_path / f"bad-{arch}-{len(keys)}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_files_are_one_line_errors(files, tmp_path) -> None:
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    cases = [
        (tmp_path / "missing.gguf", r"missing\.gguf: not found"),
        (not_gguf, r"x\.gguf: not a GGUF file"),
        (
            _write(tmp_path, "falcon"),
            r"architecture 'falcon' is not supported \(llama, qwen3, gemma3, gpt2\)",
        ),
        (_write(tmp_path, "llama", embedding_length=64), r"metadata llama\.attention\.head_count is missing"),
    ]
    for path, message in cases:
        with pytest.raises(GGUFImportError, match=message) as err:
            load_gguf(path)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_the_fast_reader_reads_what_ggufs_own_reader_reads(files, qtype) -> None:
    import gguf

    _, path = files[qtype]
    ours, theirs = _reader(path), gguf.GGUFReader(str(path))
    assert read_metadata(ours) == read_metadata(theirs)
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in ours.tensors] == [
        (t.name, t.tensor_type, t.shape.tolist()) for t in theirs.tensors
    ]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_rope_freqs_and_sentencepiece_vocabularies_are_refused(files, tmp_path) -> None:
    import gguf

    _, good = files["F32"]
    reader = gguf.GGUFReader(str(good))
    writer = gguf.GGUFWriter(str(tmp_path / "rope.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.model":
            value = "llama"  # SentencePiece: a tokenizer this importer does not build
        writer.add_key_value(
            key, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None
        )
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFImportError, match=r"rope_freqs, Llama 3\.1\+\) are not supported"):
        load_gguf(tmp_path / "rope.gguf")
