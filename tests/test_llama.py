"""Llama / SmolLM2 / Qwen3 / Gemma 3 from scratch vs Hugging Face ``transformers`` on random tiny models.

Each family: a random ``transformers`` model (weights redrawn large enough that a wrong norm, rotation or mask
shows) saved with ``save_pretrained`` → :func:`gptlab.formats.hf_read.load_hf_decoder` → logits within 1e-4 and
identical greedy tokens, with and without the KV cache, batched with left padding, and past Gemma 3's sliding
window.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gptlab.config import DECODER_PRESETS, DecoderConfig
from gptlab.formats.hf_read import HFImportError, config_from_hf, load_hf_decoder
from gptlab.generate import generate
from gptlab.llama import Decoder, rope_frequencies

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def hf_configs() -> dict:
    return {
        # Llama 3.2: llama3 RoPE scaling with all three frequency bands present, an untied head.
        "llama32": (
            LlamaForCausalLM,
            LlamaConfig(
                **COMMON,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        ),
        "smollm2": (
            LlamaForCausalLM,
            LlamaConfig(
                **COMMON,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            ),
        ),
        "qwen3": (
            Qwen3ForCausalLM,
            Qwen3Config(
                **COMMON,
                head_dim=32,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
        ),
        "gemma3": (
            Gemma3ForCausalLM,
            Gemma3TextConfig(
                **{**COMMON, "num_key_value_heads": 1},
                head_dim=32,
                query_pre_attn_scalar=24,
                sliding_window=4,
                rms_norm_eps=1e-6,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                },
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=1,
            ),
        ),
    }


@pytest.fixture(scope="module", params=["llama32", "smollm2", "qwen3", "gemma3"])
def pair(request, tmp_path_factory):
    """(transformers model, gptlab model) with the same random weights."""
    cls, config = hf_configs()[request.param]
    torch.manual_seed(0)
    ref = cls(config).eval()
    with torch.no_grad():  # default init gives near-zero logits; larger weights make every mistake visible
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if request.param == "gemma3" else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return ref, load_hf_decoder(path)


def test_logits_match_transformers(pair) -> None:
    ref, model = pair
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    assert want.abs().max() > 5  # the random weights produce large logits: a test with teeth
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), got[:, -1:], atol=1e-5, rtol=1e-5)


def test_greedy_tokens_match_with_and_without_cache(pair) -> None:
    ref, model = pair
    prompt = [5, 17, 33, 9, 71, 12, 40]  # longer than Gemma's 4-token window
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    want = want[0, len(prompt) :].tolist()
    assert generate(model, [prompt], max_new_tokens=8, use_cache=True) == [want]
    assert generate(model, [prompt], max_new_tokens=8, use_cache=False) == [want]


def test_left_padded_batch_equals_each_prompt_alone(pair) -> None:
    _, model = pair
    prompts = [[5, 17, 33, 9, 71, 12, 40], [8, 3], [99, 98, 97, 96, 95]]
    alone = [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert generate(model, prompts, max_new_tokens=6) == alone


def test_presets_have_the_published_parameter_counts() -> None:
    with torch.device("meta"):
        counts = {
            name: Decoder(DecoderConfig.from_name(name)).num_params()
            for name in ("smollm2-135m", "llama-3.2-1b", "qwen3-0.6b", "gemma-3-270m")
        }
    assert counts == {
        "smollm2-135m": 134_515_008,
        "llama-3.2-1b": 1_235_814_400,
        "qwen3-0.6b": 596_049_920,
        "gemma-3-270m": 268_098_176,
    }
    assert {"tiny-llama", "tiny-qwen3", "tiny-gemma3"} <= set(DECODER_PRESETS)


def test_llama3_rope_frequencies_are_the_published_ones() -> None:
    scaling = {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_context_length": 8192,
    }
    inv = rope_frequencies(64, 500000.0, scaling)
    torch.testing.assert_close(inv[:4], torch.tensor([1.0, 0.6636013, 0.4403666, 0.2922278]))
    torch.testing.assert_close(inv[-1], torch.tensor(9.418306e-08))


def test_unsupported_configs_are_named() -> None:
    with pytest.raises(HFImportError, match=r"config\.json: model_type 'mistral' is not supported"):
        config_from_hf({"model_type": "mistral"})
    with pytest.raises(HFImportError, match=r"missing field 'hidden_size'"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match=r"n_head \(4\) must be a multiple of n_kv_head \(3\)"):
        DecoderConfig.from_name("tiny-llama", n_kv_head=3)


def test_lora_on_every_projection_of_each_family(pair) -> None:
    """Zero-initialised adapters leave the logits unchanged; trained and merged, the plain model reproduces them."""
    import copy

    from gptlab.lora import apply_lora, mark_trainable, merge_lora

    _, model = pair
    model = copy.deepcopy(model)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, rank=2, alpha=4.0, targets=list(Decoder.LORA_TARGETS))
    trainable, total = mark_trainable(model)
    assert 0 < trainable < total
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)
        adapted = model(ids)
        assert (adapted - before).abs().max() > 1e-3
        merge_lora(model)
        torch.testing.assert_close(model(ids), adapted, atol=1e-4, rtol=1e-4)
