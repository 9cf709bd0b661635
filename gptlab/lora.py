"""Low-Rank Adaptation (LoRA) of the GPT model's linear layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021); the book's appendix E. A frozen weight
``W`` (out, in) gets a trainable update ``ΔW = B A · alpha / rank`` with ``A`` (rank, in) and ``B`` (out, rank),
so a layer computes ``y = x Wᵀ + b + dropout(x) Aᵀ Bᵀ · alpha / rank``. ``B`` starts at zero, so a fresh
adapter leaves the model's outputs unchanged; after training, :func:`merge_lora` folds ``ΔW`` into ``W`` and
the model is a plain GPT again (no inference overhead, GPT-2 checkpoint keys).

Two conventions (``convention``): ``peft`` (the default) scales by ``alpha / rank`` and draws ``A`` Kaiming-uniform
over its (rank, in) layout, as the paper's reference code and Hugging Face peft; ``book`` is the printed book's
appendix E ``LoRALayer``: ``x @ A @ B * alpha`` (no division by rank), with ``A`` drawn over the book's (in, rank)
layout, i.e. uniform in ±1/sqrt(rank). Either way ``A``/``B`` are stored in ``nn.Linear``'s (out, in) layout.

Typical use (book ch. 6 classifier with LoRA)::

    apply_lora(model, rank=8, alpha=16)             # wraps every c_attn / c_proj / c_fc
    mark_trainable(model, also=("lm_head",))        # adapters + the new classifier head train
    ...train...
    merge_lora(model)                               # plain nn.Linear layers again

Pure PyTorch; no file I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import UserError

LORA_TARGETS: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
"""Default targets: attention qkv (``c_attn``) and output (``attn.c_proj``), MLP up (``c_fc``) and down
(``mlp.c_proj``) projections — every linear layer in a block (the book's appendix E replaces them all too)."""

_LORA_PARAMS = ("lora_A", "lora_B")
CONVENTIONS = ("peft", "book")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``y = x Wᵀ + b + (dropout(x) Aᵀ Bᵀ) · scaling``, where
    ``scaling`` is ``alpha / rank`` (``convention="peft"``) or ``alpha`` (``"book"``, the book's appendix E).

    Subclasses ``nn.Linear`` so the frozen base keeps the parameter names ``weight``/``bias`` (checkpoint keys
    stay GPT-2's) and code that checks ``isinstance(m, nn.Linear)`` still sees a linear layer. Adds ``lora_A``
    (rank, in_features; Kaiming-uniform as in the paper's reference code and peft) and ``lora_B``
    (out_features, rank; zeros, so a fresh adapter changes nothing). Dropout applies to the adapter's input
    only, as in peft; the base path is untouched.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        convention: str = "peft",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_hyperparameters(rank, alpha, dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.alpha = float(alpha)
        if convention not in CONVENTIONS:
            raise UserError(f"LoRA convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
        self.convention = convention
        self.scaling = self.alpha / rank if convention == "peft" else self.alpha
        self.dropout = float(dropout)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        # Identity when off, so eval-mode and dropout-free outputs are bit-identical to the base layer's.
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """``A`` Kaiming-uniform (``a=sqrt(5)``, nn.Linear's default) over the convention's layout, ``B`` zeros."""
        if self.convention == "book":
            # The book's A is (in, rank): its fan-in is the rank, so A ~ U(±1/sqrt(rank)).
            a = torch.empty(self.in_features, self.rank, device=self.lora_A.device, dtype=self.lora_A.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            with torch.no_grad():
                self.lora_A.copy_(a.T)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0, convention: str = "peft"
    ) -> LoRALinear:
        """Wrap ``linear``: its ``weight``/``bias`` Parameters are reused (same tensors, no copy), so tying,
        ``requires_grad`` and optimizer references carry over; the adapter gets the weight's device/dtype."""
        if isinstance(linear, LoRALinear):
            raise UserError("layer already has a LoRA adapter; merge_lora() it before adding another")
        weight = linear.weight
        # Build on the meta device so no throwaway base weight is allocated (or drawn from the RNG).
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            convention=convention,
            device="meta",
            dtype=weight.dtype,
        )
        layer.weight = weight
        layer.bias = linear.bias
        layer.lora_A = nn.Parameter(torch.empty_like(layer.lora_A, device=weight.device))
        layer.lora_B = nn.Parameter(torch.empty_like(layer.lora_B, device=weight.device))
        layer.reset_lora_parameters()
        layer.train(linear.training)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        base = F.linear(input, self.weight, self.bias)
        # Two thin matmuls (in -> rank -> out) instead of materialising the full (out, in) product B A.
        update = F.linear(F.linear(self.lora_dropout(input), self.lora_A), self.lora_B)
        return base + update * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + B A · scaling`` and a copy of the bias (this layer is unchanged).

        The new Parameters keep the base's ``requires_grad``, so merging never unfreezes a frozen model.
        """
        weight = self.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        merged_weight = (
            weight.to(dtype) + (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        ).to(weight.dtype)
        # Meta first: nn.Linear's own init would allocate and consume the global RNG for nothing.
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged_weight, requires_grad=weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def check_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    """ValueError naming the first of rank (> 0 int), alpha (> 0) or dropout ([0, 1)) that is out of range."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0 or math.isinf(alpha):
        raise UserError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _embedding_weight_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = LORA_TARGETS,
    dropout: float = 0.0,
    convention: str = "peft",
) -> list[str]:
    """Wrap every ``nn.Linear`` whose attribute name (last component of its qualified name) is in ``targets``
    in a :class:`LoRALinear`, in place; returns the qualified names wrapped, sorted.

    Freezes nothing (that is :func:`mark_trainable`'s job). A layer whose weight is shared with an embedding
    (GPT-2's tied ``lm_head``) is never wrapped: the adapter would change the head but not the embedding,
    silently breaking the tie, so asking for it is an error. A classifier head (``num_classes``) is untied and
    may be targeted.
    """
    check_hyperparameters(rank, alpha, dropout)
    wanted = (targets,) if isinstance(targets, str) else tuple(targets)
    if not wanted:
        raise UserError("LoRA targets must name at least one linear layer (e.g. 'c_attn')")
    linears = [(name, m) for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]
    available = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise UserError(
            f"LoRA target(s) {', '.join(map(repr, unknown))} match no linear layer; "
            f"available linear layer names: {', '.join(available) or '(none)'}"
        )
    chosen = sorted((name, m) for name, m in linears if name.rsplit(".", 1)[-1] in wanted)
    tied = _embedding_weight_ids(model)
    for name, m in chosen:
        if id(m.weight) in tied:
            raise UserError(
                f"cannot apply LoRA to {name!r}: its weight is tied to the token embedding "
                "(untie it, e.g. a classifier head, or leave it out of targets)"
            )
        if isinstance(m, LoRALinear):
            raise UserError(f"{name!r} already has a LoRA adapter; merge_lora() the model first")
    for name, m in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear.from_linear(m, rank=rank, alpha=alpha, dropout=dropout, convention=convention)
        setattr(parent, attr, layer)
    return [name for name, _ in chosen]


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    # Whole dotted components only: "transformer.h.1" must not also select "transformer.h.10".
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _lora_parameter_ids(model: nn.Module) -> set[int]:
    return {id(getattr(m, n)) for m in model.modules() if isinstance(m, LoRALinear) for n in _LORA_PARAMS}


def mark_trainable(model: nn.Module, *, train_lora: bool = True, also: Sequence[str] = ()) -> tuple[int, int]:
    """Freeze everything except the LoRA ``lora_A``/``lora_B`` (when ``train_lora``) and the parameters under
    the dotted prefixes in ``also`` (e.g. ``("lm_head",)`` for a new classifier head); returns
    :func:`count_parameters` afterwards.

    Prefixes match whole name components (``"lm_head"`` selects ``lm_head.weight`` and ``lm_head.bias``). A tied
    tensor is selected if any of its names matches, so ``also=("lm_head",)`` on a tied model also trains the
    token embedding. A prefix that matches nothing is an error (a typo would otherwise freeze the head).
    """
    prefixes = (also,) if isinstance(also, str) else tuple(also)
    lora_ids = _lora_parameter_ids(model)
    if train_lora and not lora_ids:
        raise UserError("model has no LoRA layers: call apply_lora() first, or pass train_lora=False")
    named = list(model.named_parameters(remove_duplicate=False))
    unmatched = [p for p in prefixes if not any(_matches(name, (p,)) for name, _ in named)]
    if unmatched:
        raise UserError(f"no parameters under {', '.join(map(repr, unmatched))} (in `also`)")
    keep = set(lora_ids) if train_lora else set()
    keep |= {id(p) for name, p in named if _matches(name, prefixes)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return count_parameters(model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by its :meth:`~LoRALinear.merged` plain ``nn.Linear``, in place;
    returns ``model`` (or the merged layer, when ``model`` is itself a LoRALinear). Outputs match the unmerged
    model in eval mode up to float rounding; the state dict keys become a plain model's again."""
    if isinstance(model, LoRALinear):
        return model.merged()
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.merged())
    return model


def lora_config(model: nn.Module) -> dict | None:
    """``{"rank", "alpha", "targets", "dropout", "convention"}`` of the LoRA layers in ``model`` (targets:
    their sorted attribute names), or None when there are none. Layers with differing settings are an error."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        return None
    settings = {(m.rank, m.alpha, m.dropout, m.convention) for _, m in layers}
    if len(settings) > 1:
        raise UserError(f"LoRA layers have differing (rank, alpha, dropout, convention): {sorted(settings)}")
    ((rank, alpha, dropout, convention),) = settings
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    return {
        "rank": rank,
        "alpha": alpha,
        "targets": targets,
        "dropout": dropout,
        "convention": convention,
    }


def lora_state_dict(model: nn.Module, *, also: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``*.lora_A``/``*.lora_B``), plus the state under the ``also`` prefixes (e.g.
    ``("lm_head",)``): what a fine-tune changed, to save apart from the base model. Load it back with
    ``apply_lora`` (same settings) on the base model and ``model.load_state_dict(sd, strict=False)``."""
    prefixes = (also,) if isinstance(also, str) else tuple(also)
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.rsplit(".", 1)[-1] in _LORA_PARAMS or _matches(k, prefixes)
    }


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) tensors counted once."""
    params = list(model.parameters())  # nn.Module.parameters() already yields each tensor once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total
