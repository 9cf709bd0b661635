"""Stage ``sft`` as a function: splits, training, greedy test answers in the book's layout."""

from __future__ import annotations

import torch
from stage_fixtures import SAMPLE, quick_train, tiny_chat_checkpoint, tiny_checkpoint

from gptlab.load import load_checkpoint
from stages.adapters import LoraParams
from stages.sft import SftParams, finetune


def test_finetune_answers_the_test_split(tmp_path) -> None:
    base = tiny_checkpoint(tmp_path / "base")
    params = SftParams(train=quick_train(), max_new_tokens=4, batch_size=8)
    out = finetune(params, base, SAMPLE / "instruction-data.json", "cpu")
    sizes = out.metrics["split_sizes"]
    assert sizes == {"train": 261, "test": 30, "val": 17} and out.metrics["records"] == 308
    assert len(out.responses) == 30
    assert set(out.responses[0]) == {"instruction", "input", "output", "model_response"}
    assert out.metrics["steps"] == 3 and out.history[-1]["step"] == 3


def test_split_in_file_order_as_the_book(tmp_path) -> None:
    import json

    base = tiny_checkpoint(tmp_path / "base")
    params = SftParams(split_shuffle=False, train=quick_train(max_steps=1), max_new_tokens=1)
    out = finetune(params, base, SAMPLE / "instruction-data.json", "cpu")
    records = json.loads((SAMPLE / "instruction-data.json").read_text())
    assert [r["instruction"] for r in out.responses] == [r["instruction"] for r in records[261:291]]


def test_chat_prompt_style_with_lora_on_a_llama_model(tmp_path) -> None:
    """A model with a chat template: records rendered as conversations, trained through LoRA adapters on the
    Llama projections, answers stopped at the template's end of turn and cut out of the chat."""
    base = tiny_chat_checkpoint(tmp_path / "base")
    lora = LoraParams(rank=2, alpha=4.0, targets=["q_proj", "v_proj", "down_proj"])
    params = SftParams(
        prompt_style="chat", lora=lora, train=quick_train(lr=1e-2), max_new_tokens=3, batch_size=4
    )
    out = finetune(params, base, SAMPLE / "instruction-data.json", "cpu")
    assert out.meta["prompt_format"] == "chat" and out.meta["lora"]["targets"] == [
        "down_proj",
        "q_proj",
        "v_proj",
    ]
    assert out.metrics["trainable_params"] < out.metrics["total_params"] / 10
    assert out.tokenizer.chat_template and len(out.responses) == 30
    assert all("<|im_start|>" not in r["model_response"] for r in out.responses)
    before = load_checkpoint(base)[0].state_dict()
    after = out.model.state_dict()
    assert set(after) == set(before)  # merged: plain weights again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed
    )
