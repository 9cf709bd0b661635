"""Tiny GGUF files written with the ``gguf`` package's own writer, as llama.cpp's converter writes them.

A random ``transformers`` Llama model and a small byte-level BPE vocabulary (the 256 byte symbols, a few
merges, ChatML's special tokens and template) go into a GGUF file: llama.cpp's names, its interleaved
query/key rows, its metadata keys, and the tensors stored as F32 or quantized with ``gguf.quants.quantize``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptlab.bpe import bytes_to_unicode

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ s", "o n", "a t", "Ġ w", "r e", "Ġ c", "Ġ 1", "Ġ 2"]


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): the specials first (ids 0, 1, 2), the 256 byte symbols, the merges."""
    symbols = list(bytes_to_unicode().values())
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + symbols + merged
    types = [3] * len(SPECIALS) + [1] * (len(symbols) + len(merged))
    return tokens, types, MERGES


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: interleave each head's two rotary halves (the inverse of the importer's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    return f"blk.{layer}.{BLOCK_NAMES['.'.join(rest[:-1])]}.weight"


K_QUANTS = {"Q4_K": (144, slice(0, 4)), "Q6_K": (210, slice(208, 210))}
"""Bytes per 256-weight block and where the block's fp16 scale(s) sit (ggml-common.h's block_q4_K, block_q6_K)."""


def _random_k_blocks(qtype: str, shape: tuple[int, int], rng) -> np.ndarray:
    """Random K-quant blocks with finite scales: the ``gguf`` package can read these types but not write them,
    so the test stores random bits and compares two readers of the same file."""
    size, scale = K_QUANTS[qtype]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // 256, size), dtype=np.uint8)
    n = (scale.stop - scale.start) // 2
    blocks[..., scale] = np.full(n, 0.002, np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def write_llama_gguf(model, path: Path, *, qtype: str = "F32", tokenizer_pre: str = "smollm") -> Path:
    """Write a ``transformers`` ``LlamaForCausalLM`` as llama.cpp would: matrices in ``qtype``, norms in F32.

    K-quant types hold random blocks in the matrices 256 wide (the rest in F16): see :func:`_random_k_blocks`.
    """
    import gguf

    cfg = model.config
    tokens, types, merges = vocabulary()
    assert cfg.vocab_size == len(tokens), "the model's vocabulary must be the tiny tokenizer's"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    quant = getattr(gguf.GGMLQuantizationType, qtype)
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().to(torch.float32).numpy()
        if ".q_proj." in name:
            w = _permute(w, cfg.num_attention_heads)
        elif ".k_proj." in name:
            w = _permute(w, cfg.num_key_value_heads)
        if quant.name in K_QUANTS and w.ndim == 2 and w.shape[1] % 256 == 0:
            writer.add_tensor(gguf_name(name), _random_k_blocks(quant.name, w.shape, rng), raw_dtype=quant)
        elif quant.name in K_QUANTS and w.ndim == 2:
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        elif w.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(*, tie: bool = True, seed: int = 0, context_length: int = 128):
    """A random ``transformers`` Llama whose vocabulary is :func:`vocabulary`'s, weights drawn large enough
    that a wrong rotation or norm shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocabulary()[0]),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model
