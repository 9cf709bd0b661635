"""Architecture configs and presets: :class:`GPTConfig` (the book's GPT) and :class:`DecoderConfig` (Llama 3.2 /
SmolLM2, Qwen3, Gemma 3; the model is :mod:`gptlab.llama`).

The four GPT-2 sizes follow Radford et al. (2019) and the book's ``GPT_CONFIG_124M`` (ch. 4) / ``model_configs``
(ch. 5); the decoder presets are the models' Hugging Face ``config.json`` values. The layout of a typed config
with a presets dict follows litgpt's ``config.py``. No torch here: reading a checkpoint's config builds no model. Training
hyper-parameters live with the training loop and the stages, never here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gptlab.errors import UserError


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT-2 style decoder-only transformer."""

    name: str = "custom"
    """Preset name this config came from (informational)."""
    vocab_size: int = 50257
    """Number of real tokens; logits are always returned over exactly this many."""
    padded_vocab_size: int | None = None
    """Embedding/head rows, rounded up for matmul efficiency (nanoGPT uses 50304). ``None``: ``vocab_size``."""
    context_length: int = 1024
    """Maximum sequence length (size of the learned position embedding)."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block."""
    n_embd: int = 768
    """Embedding (residual stream) width."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (the book's ``drop_rate``)."""
    qkv_bias: bool = True
    """Bias on the fused query/key/value projection (OpenAI GPT-2: True; the book pretrains with False)."""
    bias: bool = True
    """Bias on the other linear layers and the LayerNorms."""
    tie_weights: bool = True
    """Share the token embedding with the LM head (GPT-2 does)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    num_classes: int | None = None
    """If set, the output head predicts this many classes instead of tokens (book ch. 6)."""

    def __post_init__(self) -> None:
        for field in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"GPTConfig.{field} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise UserError(
                f"GPTConfig.padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError(f"GPTConfig.num_classes must be >= 2, got {self.num_classes}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def embedding_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    @property
    def tied(self) -> bool:
        """Whether the head really shares the embedding (a classifier head never does)."""
        return self.tie_weights and self.num_classes is None

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(name=name, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)


_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True, bias=True, tie_weights=True)

PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI GPT-2 (Radford et al., 2019); sizes as in the book's ch. 5 ``model_configs``.
    "gpt2-small": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small models that train on a laptop CPU in minutes (sample profile) and in tests in seconds.
    "gpt-mini": dict(_GPT2, context_length=256, n_layer=4, n_head=4, n_embd=128, qkv_bias=False),
    "gpt-micro": dict(_GPT2, context_length=128, n_layer=2, n_head=2, n_embd=64, qkv_bias=False),
    "gpt-nano": dict(vocab_size=256, context_length=32, n_layer=2, n_head=2, n_embd=16, qkv_bias=True),
}

GPT2_PRESETS = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")


# --- The Llama-family decoder (gptlab.llama) -------------------------------------------------------------

FAMILIES = ("llama", "qwen3", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a Llama-style decoder (Llama 3.2, SmolLM2, Qwen3, Gemma 3)."""

    family: str = "llama"
    """``llama`` (Llama 3.x, SmolLM2), ``qwen3`` or ``gemma3``: which Hugging Face layout it imports from."""
    name: str = "custom"
    """Preset name this config came from (informational)."""
    vocab_size: int = 49152
    context_length: int = 2048
    """Longest sequence the model is used for (RoPE has no table; this bounds the KV cache)."""
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    """Key/value heads; ``n_head`` must be a multiple (grouped-query attention)."""
    n_embd: int = 576
    head_size: int | None = None
    """Per-head width; ``None``: ``n_embd // n_head`` (Qwen3 and Gemma 3 set it explicitly)."""
    intermediate_size: int = 1536
    """Width of the gated MLP's hidden layer."""
    activation: str = "silu"
    """``silu`` (SwiGLU: Llama, Qwen) or ``gelu_tanh`` (GeGLU: Gemma)."""
    rms_norm_eps: float = 1e-5
    norm_offset: float = 0.0
    """RMSNorm multiplies by ``norm_offset + weight`` (Gemma stores ``weight - 1``: offset 1)."""
    rope_theta: float = 10000.0
    rope_scaling: dict[str, float] | None = None
    """Llama 3's frequency scaling: ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_context_length``; or ``{"factor": f}`` alone for linear scaling (Gemma 3's global layers)."""
    rope_local_theta: float | None = None
    """RoPE base of sliding-window layers (Gemma 3: 10 000); ``None``: ``rope_theta``."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)."""
    sandwich_norm: bool = False
    """Normalise each sub-layer's output too (Gemma's post-attention / post-feedforward norms)."""
    embed_scale: bool = False
    """Multiply token embeddings by sqrt(n_embd) (Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores scale by ``query_pre_attn_scalar ** -0.5``; ``None``: ``head_size ** -0.5``."""
    sliding_window: int | None = None
    """Keys a sliding-window layer sees: the current position and the ``sliding_window - 1`` before it."""
    layer_types: tuple[str, ...] | None = None
    """``full`` or ``sliding`` per layer; ``None``: all full."""
    attention_bias: bool = False
    """Bias on q/k/v/o projections (none of the supported families uses one)."""
    tie_weights: bool = True
    """Share the token embedding with the LM head."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches (0 for all released models; for finetuning)."""
    num_classes: int | None = None
    """If set, the output head predicts this many classes instead of tokens (book ch. 6)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UserError(f"DecoderConfig.family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"DecoderConfig.activation must be one of {', '.join(ACTIVATIONS)}")
        for name in (
            "vocab_size",
            "context_length",
            "n_layer",
            "n_head",
            "n_kv_head",
            "n_embd",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"DecoderConfig.{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise UserError(
                f"DecoderConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.head_size is None and self.n_embd % self.n_head:
            raise UserError(
                f"DecoderConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.n_layer or set(self.layer_types) - set(LAYER_TYPES):
                raise UserError(
                    f"DecoderConfig.layer_types must list 'full'/'sliding' for each of the {self.n_layer} layers"
                )
            if "sliding" in self.layer_types and not self.sliding_window:
                raise UserError("DecoderConfig.sliding_window is required for 'sliding' layers")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"DecoderConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError(f"DecoderConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.head_size is None:
            object.__setattr__(self, "head_size", self.n_embd // self.n_head)

    @property
    def tied(self) -> bool:
        """Whether the head really shares the embedding (a classifier head never does)."""
        return self.tie_weights and self.num_classes is None

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size

    def layer_type(self, i: int) -> str:
        return "full" if self.layer_types is None else self.layer_types[i]

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DecoderConfig:
        if name not in DECODER_PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(DECODER_PRESETS)}")
        return cls(name=name, **{**DECODER_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["layer_types"] is not None:
            data["layer_types"] = list(data["layer_types"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown DecoderConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


def _gemma3_layers(n_layer: int, every: int = 6) -> tuple[str, ...]:
    # Gemma 3: five sliding-window layers, then one global layer, repeated.
    return tuple("full" if (i + 1) % every == 0 else "sliding" for i in range(n_layer))


_SMOLLM2 = dict(
    family="llama", vocab_size=49152, context_length=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
    intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100000.0, tie_weights=True,
)  # fmt: skip
_LLAMA32_1B = dict(
    family="llama", vocab_size=128256, context_length=131072, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
    intermediate_size=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_weights=True,
    rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192},
)  # fmt: skip
_QWEN3_06B = dict(
    family="qwen3", vocab_size=151936, context_length=40960, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024,
    head_size=128, intermediate_size=3072, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, tie_weights=True,
)  # fmt: skip
_GEMMA3_270M = dict(
    family="gemma3", vocab_size=262144, context_length=32768, n_layer=18, n_head=4, n_kv_head=1, n_embd=640,
    head_size=256, intermediate_size=2048, activation="gelu_tanh", rms_norm_eps=1e-6, norm_offset=1.0,
    rope_theta=1000000.0, rope_local_theta=10000.0, qk_norm=True, sandwich_norm=True, embed_scale=True,
    query_pre_attn_scalar=256.0, sliding_window=512, layer_types=_gemma3_layers(18), tie_weights=True,
)  # fmt: skip

DECODER_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": _SMOLLM2,
    "smollm2-135m-instruct": _SMOLLM2,
    "llama-3.2-1b": _LLAMA32_1B,
    "llama-3.2-1b-instruct": _LLAMA32_1B,
    "qwen3-0.6b": _QWEN3_06B,
    "gemma-3-270m": _GEMMA3_270M,
    "gemma-3-270m-it": _GEMMA3_270M,
    # Tiny members of each family for tests: every code path of the full model in milliseconds.
    "tiny-llama": dict(
        family="llama", vocab_size=512, context_length=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
        intermediate_size=64, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16},
    ),
    "tiny-qwen3": dict(
        family="qwen3", vocab_size=512, context_length=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
        head_size=16, intermediate_size=64, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
    ),
    "tiny-gemma3": dict(
        family="gemma3", vocab_size=512, context_length=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
        head_size=16, intermediate_size=64, activation="gelu_tanh", rms_norm_eps=1e-6, norm_offset=1.0,
        rope_theta=1000000.0, rope_local_theta=10000.0, qk_norm=True, sandwich_norm=True, embed_scale=True,
        query_pre_attn_scalar=16.0, sliding_window=4, layer_types=("sliding", "sliding", "full"),
    ),
}  # fmt: skip
