"""GGUF export (:mod:`gptlab.formats.gguf_write`, :mod:`gptlab.formats.modelfile`) checked by independent readers.

Tiny random GPT-2 and Llama / Qwen3 / Gemma 3 checkpoints (weights drawn large so that a wrong permutation, norm
offset or transposition shows) are exported, then read back by ``gguf.GGUFReader`` (keys, names, shapes,
types), by ``transformers`` (``from_pretrained(dir, gguf_file=...)``: logits against gptlab's on the same
weights rounded as the file stores them, greedy generations, the tokenizer) and by gptlab's own importer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_gguf import CHATML, vocabulary
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptlab.checkpoint import save_checkpoint
from gptlab.config import DecoderConfig, GPTConfig
from gptlab.formats.gguf_read import load_gguf, read_metadata
from gptlab.formats.gguf_write import QTYPES, GGUFExportError, export_gguf, gpt2_vocabulary, modelfile_path
from gptlab.formats.modelfile import CHAT_FAMILIES, chat_family, render_modelfile
from gptlab.generate import generate
from gptlab.hf_tokenizer import HFTokenizer
from gptlab.llama import Decoder, rope_frequencies
from gptlab.load import load_checkpoint
from gptlab.model import GPT
from gptlab.tokenizer import encode as gpt2_encode

IDS = torch.tensor(
    [[5, 70, 80, 90, 100, 3, 200, 7, 9, 260, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
)
TEXT = "Hello world, it's 2024!  Tabs\tand   spaces 12345 éà <|im_end|> the end"


def _redraw(model: torch.nn.Module, *, gemma: bool = False) -> None:
    """Large random weights (the default init gives near-zero logits that hide mistakes)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(0.0, 0.1) if gemma else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)


def _tiny_tokenizer(pre: str) -> HFTokenizer:
    tokens, types, merges = vocabulary()
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.chat_template": CHATML,
    }
    return HFTokenizer.from_gguf_metadata(meta)


DECODERS = {
    # Llama with an untied head and Llama 3's split regex; Qwen3 with a vocabulary padded past the tokenizer's
    # (llama.cpp pads with unused [PADi] tokens); Gemma 3 with its norms, scales and sliding window.
    "llama": (
        dict(family="llama", vocab_size=273, n_head=4, n_kv_head=2, rope_theta=100000.0, tie_weights=False),
        "llama-bpe",
    ),
    "qwen3": (
        dict(
            family="qwen3",
            vocab_size=280,
            n_head=4,
            n_kv_head=2,
            head_size=32,
            qk_norm=True,
            rms_norm_eps=1e-6,
        ),
        "qwen2",
    ),
    "gemma3": (
        dict(
            family="gemma3",
            vocab_size=273,
            n_head=4,
            n_kv_head=1,
            head_size=32,
            activation="gelu_tanh",
            norm_offset=1.0,
            rope_theta=1e6,
            rope_local_theta=10000.0,
            qk_norm=True,
            sandwich_norm=True,
            embed_scale=True,
            query_pre_attn_scalar=32.0,
            sliding_window=4,
            layer_types=("sliding", "sliding"),
            rms_norm_eps=1e-6,
        ),
        "smollm",
    ),
}


HF_OVERRIDES = {
    # What transformers' GGUF config mapping does not read from the file: values every released model of the
    # family has (Qwen3's head_dim 128, Gemma 3's query_pre_attn_scalar 256), so the tiny models say theirs.
    "llama": {},
    "qwen3": {"head_dim": 32},
    "gemma3": {"query_pre_attn_scalar": 32},
}


def decoder_checkpoint(path, family: str):
    fields, pre = DECODERS[family]
    cfg = DecoderConfig(
        **{"context_length": 128, "n_layer": 2, "n_embd": 64, "intermediate_size": 128, **fields}
    )
    model = Decoder(cfg).eval()
    _redraw(model, gemma=family == "gemma3")
    save_checkpoint(model, path, tokenizer=_tiny_tokenizer(pre))
    return path


def gpt_checkpoint(path):
    """GPT-2 layout with an untied head, no biases and padded embedding rows: every path of the mapping."""
    cfg = GPTConfig.from_name("gpt-micro", tie_weights=False, bias=False, padded_vocab_size=50304)
    model = GPT(cfg).eval()
    _redraw(model)
    save_checkpoint(model, path)
    return path


def rounded(model: torch.nn.Module, qtype: str) -> torch.nn.Module:
    """``model`` with every matrix rounded as the exported file stores it (through ``gguf.quants``; 1-D tensors
    stay float32), so the file's readers must reproduce its logits to float32 rounding."""
    from gguf.quants import dequantize, quantize

    from gptlab.formats.gguf_write import tensor_type

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                w = p.detach().numpy()
                kind = tensor_type(name, w, qtype)
                p.copy_(torch.from_numpy(np.asarray(dequantize(quantize(w, kind), kind), dtype=np.float32)))
    return model


def hf_model(path, **overrides):
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **overrides
    ).eval()


def hf_greedy(model, prompt: list[int], n: int = 8) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def gpt_files(tmp_path_factory):
    ckpt = gpt_checkpoint(tmp_path_factory.mktemp("gpt") / "ckpt")
    out = {
        q: export_gguf(ckpt, tmp_path_factory.mktemp(q) / "tiny-gpt.gguf", qtype=q) for q in ("f16", "q8_0")
    }
    return ckpt, out


@pytest.fixture(scope="module", params=list(DECODERS))
def decoder_files(request, tmp_path_factory):
    ckpt = decoder_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param)
    out = {q: export_gguf(ckpt, tmp_path_factory.mktemp(q) / "tiny.gguf", qtype=q) for q in ("f16", "q8_0")}
    return request.param, ckpt, out


# ---------------------------------------------------------------- GPT-2


def test_gpt2_file_has_llama_cpp_keys_names_shapes_and_types(gpt_files) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    _, files = gpt_files
    for qtype, matrix_type in (("q8_0", T.Q8_0),):  # reading a 50k-token vocabulary takes seconds: one file
        reader = GGUFReader(files[qtype])
        meta = read_metadata(reader)
        assert meta["general.architecture"] == "gpt2"
        assert meta["general.file_type"] == {"f16": 1, "q8_0": 7}[qtype]
        assert (meta["gpt2.context_length"], meta["gpt2.embedding_length"], meta["gpt2.block_count"]) == (
            128,
            64,
            2,
        )
        assert (meta["gpt2.feed_forward_length"], meta["gpt2.attention.head_count"]) == (256, 2)
        assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
        assert len(meta["tokenizer.ggml.tokens"]) == 50257 and len(meta["tokenizer.ggml.merges"]) == 50000
        assert meta["tokenizer.ggml.token_type"][50256] == 3 and meta["tokenizer.ggml.token_type"][0] == 1
        assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.bos_token_id"] == 50256
        assert "tokenizer.chat_template" not in meta
        tensors = {t.name: t for t in reader.tensors}
        want = {
            "token_embd.weight",
            "position_embd.weight",
            "output_norm.weight",
            "output_norm.bias",
            "output.weight",
        }
        for i in range(2):
            for kind in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"):
                want |= {f"blk.{i}.{kind}.weight", f"blk.{i}.{kind}.bias"}
        assert set(tensors) == want
        # GGUF lists dimensions innermost first: (in, out) for a torch (out, in) weight.
        assert list(tensors["token_embd.weight"].shape) == [64, 50257]  # padding rows dropped
        assert list(tensors["blk.0.attn_qkv.weight"].shape) == [64, 192]
        assert list(tensors["blk.1.ffn_down.weight"].shape) == [256, 64]
        assert list(tensors["position_embd.weight"].shape) == [64, 128]
        assert tensors["blk.0.attn_qkv.weight"].tensor_type == matrix_type
        assert tensors["blk.0.attn_qkv.bias"].tensor_type == T.F32
        assert tensors["output_norm.weight"].tensor_type == T.F32


@pytest.mark.slow  # transformers parses GPT-2's 50k tokens and merges: ~15-20 s per model load
def test_gpt2_f16_logits_and_greedy_tokens_equal_transformers(gpt_files) -> None:
    ckpt, files = gpt_files
    # transformers maps GGUF's gpt2.context_length to n_ctx, not n_positions (the position table's size): said here.
    ref = hf_model(files["f16"], n_positions=128)
    model = rounded(load_checkpoint(ckpt)[0], "f16")
    with torch.no_grad():
        want, got = ref(IDS).logits, model(IDS)
    assert want.abs().max() > 2
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    prompt = IDS[0].tolist()
    assert generate(model, [prompt], max_new_tokens=8) == [hf_greedy(ref, prompt)]


def test_gpt2_q8_0_logits_and_greedy_tokens_equal_transformers(gpt_files) -> None:
    ckpt, files = gpt_files
    ref = hf_model(files["q8_0"], n_positions=128)
    model = load_checkpoint(ckpt)[0]
    prompt = IDS[0].tolist()
    with torch.no_grad():
        want, unrounded = ref(IDS).logits, model(IDS)
    # Q8_0's own error on these large random weights (8 bits, one scale per 32 weights): about 5 % of the
    # largest logit, which is why the exact comparison below rounds gptlab's weights the same way.
    assert (unrounded - want).abs().max() < 0.1 * want.abs().max()
    model = rounded(model, "q8_0")
    with torch.no_grad():
        got = model(IDS)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert generate(model, [prompt], max_new_tokens=8) == [hf_greedy(ref, prompt)]


def test_gpt2_round_trips_through_gptlab_import(gpt_files) -> None:
    """gptlab reads its GPT-2 GGUF back into a GPT with tiktoken's tokenizer: the f16 file's weights exactly (the
    untied head kept, the padded rows gone, zero biases where the model had none)."""
    from gptlab.tokenizer import GPT2Tokenizer

    ckpt, files = gpt_files
    imported, tokenizer = load_gguf(files["f16"])
    assert isinstance(tokenizer, GPT2Tokenizer) and not imported.config.tied
    assert imported.config.vocab_size == imported.config.embedding_rows == 50257
    model = rounded(load_checkpoint(ckpt)[0], "f16")
    with torch.no_grad():
        torch.testing.assert_close(imported(IDS), model(IDS)[..., :50257], atol=2e-4, rtol=1e-4)


def test_export_cli_writes_the_file_and_modelfile_or_one_line_error(gpt_files, tmp_path) -> None:
    from gptlab.cli import main

    ckpt, _ = gpt_files
    assert main(["export", "gguf", str(ckpt), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert (tmp_path / "m.gguf").is_file() and "FROM ./m.gguf" in (tmp_path / "m.Modelfile").read_text()
    assert main(["export", "gguf", str(ckpt), str(tmp_path / "x.gguf"), "--type", "q3_k"]) == 2
    assert not (tmp_path / "x.gguf").exists()


def test_gpt2_vocabulary_from_tiktoken_equals_openai_files(shared_dir) -> None:
    """The merges recovered from tiktoken's ranks are OpenAI's vocab.bpe, the tokens its encoder.json."""
    tokens, merges = gpt2_vocabulary()
    encoder = json.loads((shared_dir / "tokenizers" / "encoder.json").read_text(encoding="utf-8"))
    assert tokens == [t for t, _ in sorted(encoder.items(), key=lambda kv: kv[1])]
    lines = (shared_dir / "tokenizers" / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert merges == [line for line in lines[1:] if line]


def test_gpt2_tokenizer_read_by_transformers_encodes_like_tiktoken(gpt_files) -> None:
    _, files = gpt_files
    path = files["f16"]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = TEXT.replace("<|im_end|>", "<|endoftext|>")
    assert tok(text)["input_ids"] == gpt2_encode(text)
    assert tok.decode(gpt2_encode(text)) == text


def test_gpt2_modelfile_uses_the_alpaca_prompt(gpt_files) -> None:
    from gptlab.prompts import format_input

    _, files = gpt_files
    text = modelfile_path(files["f16"]).read_text()
    assert modelfile_path(files["f16"]).name == "tiny-gpt.Modelfile"
    assert "FROM ./tiny-gpt.gguf" in text.splitlines()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    entry = {"instruction": "Name a colour."}
    assert (
        template.replace("{{ .Prompt }}", entry["instruction"]) == format_input(entry) + "\n\n### Response:\n"
    )
    assert 'PARAMETER stop "<|endoftext|>"' in text and "PARAMETER num_ctx 128" in text


# ---------------------------------------------------------------- decoders


def test_decoder_file_has_expected_keys_names_shapes_and_types(decoder_files) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    family, ckpt, files = decoder_files
    model = load_checkpoint(ckpt)[0]
    cfg = model.config
    reader = GGUFReader(files["q8_0"])
    meta = read_metadata(reader)
    assert meta["general.architecture"] == family
    for key, value in (
        ("context_length", 128),
        ("embedding_length", 64),
        ("block_count", 2),
        ("feed_forward_length", 128),
        ("attention.head_count", cfg.n_head),
        ("attention.head_count_kv", cfg.n_kv_head),
    ):
        assert meta[f"{family}.{key}"] == value, key
    assert meta[f"{family}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta[f"{family}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    if family != "llama":
        assert meta[f"{family}.attention.key_length"] == 32
    assert meta["tokenizer.ggml.pre"] == DECODERS[family][1].replace("smollm", "gpt-2")  # ByteLevel alone
    assert meta["tokenizer.chat_template"] == CHATML
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    if cfg.vocab_size > 273:
        assert tokens[273] == "[PAD273]" and meta["tokenizer.ggml.token_type"][273] == 5
    tensors = {t.name: t for t in reader.tensors}
    ours = {
        "llama": {
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "attn_norm",
            "ffn_norm",
        }
    }
    ours["qwen3"] = ours["llama"] | {"attn_q_norm", "attn_k_norm"}
    ours["gemma3"] = ours["qwen3"] | {"post_attention_norm", "post_ffw_norm"}
    want = {f"blk.{i}.{k}.weight" for i in range(2) for k in ours[family]}
    want |= {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not cfg.tied else set())
    assert set(tensors) == want
    assert list(tensors["blk.0.attn_q.weight"].shape) == [64, cfg.n_head * cfg.head_size]
    assert list(tensors["token_embd.weight"].shape) == [64, cfg.vocab_size]
    assert tensors["blk.0.attn_k.weight"].tensor_type == T.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32


def test_decoder_logits_and_greedy_tokens_equal_transformers_and_gptlab_import(decoder_files) -> None:
    family, ckpt, files = decoder_files
    prompt = IDS[0].tolist()
    original = load_checkpoint(ckpt)[0]
    for qtype in ("f16", "q8_0"):
        path = files[qtype]
        ref = hf_model(path, **HF_OVERRIDES[family])
        imported, _ = load_gguf(path)  # gptlab's own importer: the round trip
        model = rounded(load_checkpoint(ckpt)[0], qtype)  # the original weights as the file rounds them
        with torch.no_grad():
            want, back, got = ref(IDS).logits, imported(IDS), model(IDS)
        assert want.abs().max() > 2
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(back, want, atol=2e-4, rtol=1e-4)
        greedy = hf_greedy(ref, prompt)
        assert generate(model, [prompt], max_new_tokens=8) == [greedy]
        assert generate(imported, [prompt], max_new_tokens=8) == [greedy]
        # The unrounded checkpoint: F16's rounding leaves the greedy continuation alone; Q8_0's moves the logits
        # of these large random weights by up to ~10 % of the largest, enough to flip near-ties of a random
        # model (the real model's Q8_0 reply is checked in test_smollm2_q8_0_chat_tokens_equal_gptlab).
        with torch.no_grad():
            exact = original(IDS)
        if qtype == "f16":
            torch.testing.assert_close(exact, want, atol=2e-2, rtol=1e-2)
            assert generate(original, [prompt], max_new_tokens=8) == [greedy]
        else:
            assert (exact - want).abs().max() < 0.1 * want.abs().max()


def test_decoder_tokenizer_read_by_transformers_encodes_like_gptlab(decoder_files) -> None:
    family, ckpt, files = decoder_files
    path = files["f16"]
    ours = HFTokenizer.from_dir(ckpt)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT, add_special_tokens=False)
    _, back = load_gguf(path)
    assert back.encode(TEXT) == ours.encode(TEXT)
    messages = [{"role": "user", "content": "Hi there"}]
    assert back.encode_chat(messages) == ours.encode_chat(messages)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_every_qtype_round_trips_through_gptlab_import(tmp_path, qtype) -> None:
    """Each supported type: the matrices stored in it (when their rows split into its blocks), and gptlab's
    importer reproduces the logits of the original weights rounded through ``gguf.quants``."""
    from gguf import GGMLQuantizationType, GGUFReader

    ckpt = decoder_checkpoint(tmp_path / "ckpt", "llama")
    path = export_gguf(ckpt, tmp_path / f"m-{qtype}.gguf", qtype=qtype, modelfile=False)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == getattr(GGMLQuantizationType, QTYPES[qtype][0])
    imported, _ = load_gguf(path)
    model = rounded(load_checkpoint(ckpt)[0], qtype)
    with torch.no_grad():
        torch.testing.assert_close(imported(IDS), model(IDS), atol=2e-4, rtol=1e-4)


def test_unmerged_lora_checkpoint_exports_merged_weights(tmp_path) -> None:
    from gptlab.lora import apply_lora, lora_config, merge_lora

    fields, pre = DECODERS["llama"]
    cfg = DecoderConfig(
        **{"context_length": 128, "n_layer": 2, "n_embd": 64, "intermediate_size": 128, **fields}
    )
    model = Decoder(cfg).eval()
    _redraw(model)
    apply_lora(model, rank=2, alpha=4.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0.0, 0.3)  # B starts at zero: make the adapters count
    save_checkpoint(
        model, tmp_path / "ckpt", tokenizer=_tiny_tokenizer(pre), meta={"lora": lora_config(model)}
    )
    path = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", qtype="f32", modelfile=False)
    imported, _ = load_gguf(path)
    with torch.no_grad():
        want = merge_lora(model)(IDS)
        torch.testing.assert_close(imported(IDS), want, atol=1e-4, rtol=1e-4)


LLAMA31_SCALING = {
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_context_length": 64,
}


def rope_scaled_llama_checkpoint(path: Path) -> Path:
    """A tiny Llama 3.1-style checkpoint (RoPE scaling, theta 500k) with a byte-level BPE tokenizer."""
    cfg = DecoderConfig(
        family="llama", vocab_size=273, context_length=128, n_layer=1, n_head=4, n_kv_head=2, n_embd=64,
        intermediate_size=128, rope_theta=500000.0, rope_scaling=LLAMA31_SCALING,
    )  # fmt: skip
    return save_checkpoint(Decoder(cfg), path, tokenizer=_tiny_tokenizer("llama-bpe"))


def test_llama3_rope_scaling_is_written_as_llama_cpp_rope_freqs(tmp_path) -> None:
    scaling = LLAMA31_SCALING
    rope_scaled_llama_checkpoint(tmp_path / "ckpt")
    from gguf import GGUFReader

    reader = GGUFReader(
        export_gguf(tmp_path / "ckpt", tmp_path / "scaled.gguf", qtype="f32", modelfile=False)
    )
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    want = rope_frequencies(16, 500000.0) / rope_frequencies(16, 500000.0, scaling)
    np.testing.assert_allclose(np.asarray(freqs.data), want.numpy(), rtol=1e-6)
    assert want.max() == 32.0 and want.min() == 1.0  # all three bands present
    assert not (tmp_path / "scaled.Modelfile").exists()


# ---------------------------------------------------------------- Modelfile


def _render_go(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of one of gptlab's templates, for this test: the subset they use (a range over
    .Messages, $last, if/else on the role, trim markers) interpreted directly."""
    body = re.fullmatch(r"\{\{- range \$i, \$_ := \.Messages \}\}(.*)\{\{- end \}\}", template, re.S).group(1)
    body = re.sub(r"\s*\{\{-", "{{", body).rstrip()  # `{{-` trims the whitespace before it
    out = []
    for i, message in enumerate(messages):
        last = i == len(messages) - 1
        conditions = {
            'and $last (ne .Role "assistant")': last and message["role"] != "assistant",
            'eq .Role "assistant"': message["role"] == "assistant",
        }
        text = body.replace("{{ $last := eq (len (slice $.Messages $i)) 1 }}", "")
        pattern = r"\{\{ if (.*?) \}\}(.*?)(?:\{\{ else \}\}(.*?))?\{\{ end \}\}"
        text = re.sub(
            pattern,
            lambda m, c=conditions: m.group(2) if c[m.group(1)] else (m.group(3) or ""),
            text,
            flags=re.S,
        )
        out.append(text.replace("{{ .Role }}", message["role"]).replace("{{ .Content }}", message["content"]))
    return "".join(out)


def test_chatml_modelfile_renders_like_the_jinja_template(decoder_files) -> None:
    family, ckpt, files = decoder_files
    text = modelfile_path(files["f16"]).read_text()
    assert "FROM ./tiny.gguf" in text.splitlines()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S).group(1)
    assert system == "You are a helpful assistant."
    tok = HFTokenizer.from_dir(ckpt)
    for messages in (
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
    ):
        # Ollama sends the Modelfile's SYSTEM as the first message when the request has none.
        rendered = _render_go(template, [{"role": "system", "content": system}, *messages])
        assert rendered == tok.apply_chat_template(messages)
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 128" in text


@pytest.mark.parametrize(
    "template,messages,want",
    [
        (
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
            "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (
            "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}",
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "?"},
            ],
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n<start_of_turn>user\n?"
            "<end_of_turn>\n<start_of_turn>model\n",
        ),
    ],
)
def test_llama3_and_gemma_templates_convert(template, messages, want) -> None:
    family = chat_family(template)
    assert family in CHAT_FAMILIES
    assert _render_go(family.template, messages) == want
    text = render_modelfile("m.gguf", chat_template=template, stop_tokens=["<eos>"], context_length=64)
    assert f"PARAMETER stop {json.dumps(family.turn_end)}" in text and 'PARAMETER stop "<eos>"' in text


def test_unknown_chat_template_gets_a_modelfile_without_template() -> None:
    text = render_modelfile(
        "m.gguf", chat_template="{{ messages[0]['content'] }}", stop_tokens=["</s>"], context_length=64
    )
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert any(line.startswith("#") and "no TEMPLATE" in line for line in text.splitlines())
    assert "FROM ./m.gguf" in text and 'PARAMETER stop "</s>"' in text


# ---------------------------------------------------------------- errors


def test_bad_qtype_is_one_line_error_naming_the_choices(tmp_path) -> None:
    ckpt = decoder_checkpoint(tmp_path / "ckpt", "llama")
    with pytest.raises(GGUFExportError) as err:
        export_gguf(ckpt, tmp_path / "out" / "m.gguf", qtype="q3_k")
    message = str(err.value)
    assert "\n" not in message and "q3_k" in message and all(q in message for q in QTYPES)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_classifier_checkpoint_is_refused_and_nothing_written(tmp_path) -> None:
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig.from_name("gpt-micro", n_layer=1, num_classes=2)), tmp_path / "clf")
    (tmp_path / "out").mkdir()
    with pytest.raises(GGUFExportError, match="classifier") as err:
        export_gguf(tmp_path / "clf", tmp_path / "out" / "m.gguf")
    assert "\n" not in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_non_byte_level_tokenizer_is_refused(tmp_path) -> None:
    """Gemma's and Llama 2's sentencepiece-style vocabularies (``tokenizer.ggml.model`` 'llama') are not written."""
    ckpt = decoder_checkpoint(tmp_path / "ckpt", "llama")
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["decoder"] = {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "always",
        "split": True,
    }
    (ckpt / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFExportError, match="only byte-level BPE") as err:
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "m.gguf").exists()


def test_decoder_llama_cpp_cannot_express_is_refused(tmp_path) -> None:
    fields, pre = DECODERS["gemma3"]
    cfg = DecoderConfig(
        **{**fields, "context_length": 128, "n_layer": 2, "n_embd": 64, "intermediate_size": 128},
    ).replace(query_pre_attn_scalar=24.0)  # Gemma 3 27B's kind: llama.cpp assumes the head size
    save_checkpoint(Decoder(cfg), tmp_path / "ckpt", tokenizer=_tiny_tokenizer(pre))
    with pytest.raises(GGUFExportError, match="query_pre_attn_scalar") as err:
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "m.gguf").exists()


def test_failed_write_leaves_no_file(tmp_path, monkeypatch) -> None:
    import gptlab.formats.gguf_write as mod

    ckpt = decoder_checkpoint(tmp_path / "ckpt", "llama")
    (tmp_path / "out").mkdir()

    def broken(model, path, *, qtype):
        Path(path).write_bytes(b"GGUF partial")
        raise OSError("disk full")

    monkeypatch.setattr(mod, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(ckpt, tmp_path / "out" / "m.gguf")
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_q8_0_chat_tokens_equal_gptlab(smollm2_dir, tmp_path) -> None:
    """SmolLM2-135M-Instruct to Q8_0 (and F16, for the sizes); transformers' greedy chat reply from the Q8_0
    file equals gptlab's from the checkpoint."""
    sizes = {}
    for qtype in ("f16", "q8_0"):
        out = export_gguf(smollm2_dir, tmp_path / f"smollm2-{qtype}.gguf", qtype=qtype)
        sizes[qtype] = out.stat().st_size / 1e6
    print(f"SmolLM2-135M GGUF sizes (MB): {sizes}")
    assert 255 < sizes["f16"] < 285 and 135 < sizes["q8_0"] < 155, sizes  # 134.5M weights at 16 and 8.5 bits
    model, _ = load_checkpoint(smollm2_dir)
    tok = HFTokenizer.from_dir(smollm2_dir)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ours = generate(model, [prompt], max_new_tokens=16, eos_id=tok.stop_ids)[0]
    theirs = hf_greedy(hf_model(out), prompt, 16)
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t in tok.stop_ids), len(theirs))]
    assert theirs == ours, (tok.decode(theirs), tok.decode(ours))
    text = modelfile_path(out).read_text()
    assert (
        "PARAMETER num_ctx 8192" in text and 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    )
