"""GPT architecture configs and presets.

The four GPT-2 sizes follow Radford et al. (2019) and the book's ``GPT_CONFIG_124M`` (ch. 4) / ``model_configs``
(ch. 5); the layout of a typed config with a presets dict follows litgpt's ``config.py``. Training
hyper-parameters live with the training loop and the stages, never here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
                raise ValueError(f"GPTConfig.{field} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"GPTConfig.padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"GPTConfig.num_classes must be >= 2, got {self.num_classes}")

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
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(name=name, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
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
