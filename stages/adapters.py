"""LoRA settings shared by the finetuning stages (classify, sft, dpo): one params dataclass, applied and
merged the same way (:mod:`gptlab.lora`; the book's appendix E)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from gptlab import lora
from gptlab.errors import UserError
from stages.params import check_choice


@dataclass
class LoraParams:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(lora.LORA_TARGETS))
    """Layers to adapt by attribute name: GPT-2's ``c_attn c_proj c_fc``; Llama/Qwen/Gemma's ``q_proj k_proj
    v_proj o_proj gate_proj up_proj down_proj``. For the classifier, with ``lm_head`` among them the new head
    gets an adapter and its own weights stay frozen (the book's appendix E wraps every linear layer), otherwise
    the head trains in full."""
    dropout: float = 0.0
    convention: str = "peft"
    """``peft``: update scaled by alpha / rank (the paper, Hugging Face peft); ``book``: the printed book's
    appendix E ``LoRALayer`` (scaled by alpha alone, A drawn over its (in, rank) layout)."""
    merge: bool = True
    """Merge the adapters into the weights on save (False keeps them separate in the checkpoint)."""

    def __post_init__(self) -> None:
        lora.check_hyperparameters(self.rank, self.alpha, self.dropout)
        check_choice("convention", self.convention, lora.CONVENTIONS)
        if not self.targets:
            raise UserError("targets must name at least one linear layer (e.g. c_attn)")


def add_adapters(model: nn.Module, params: LoraParams, *, also: tuple[str, ...] = ()) -> None:
    """Wrap the target layers with LoRA adapters and freeze everything else (but ``also``)."""
    lora.apply_lora(
        model,
        rank=params.rank,
        alpha=params.alpha,
        targets=params.targets,
        dropout=params.dropout,
        convention=params.convention,
    )
    lora.mark_trainable(model, also=also)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``trainable_params`` (adapters only, under LoRA) and ``total_params``, before any merge."""
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def finish_adapters(model: nn.Module, params: LoraParams | None) -> dict:
    """Merge the adapters if asked; returns the checkpoint metadata that describes them."""
    adapters = lora.lora_config(model)  # before merging: afterwards there are no LoRA layers to describe
    if adapters and params is not None and params.merge:
        lora.merge_lora(model)
    return {"lora": adapters, "lora_merged": bool(adapters) and params is not None and params.merge}
