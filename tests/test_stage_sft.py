"""Stage ``sft`` as a function: splits, training, greedy test answers in the book's layout."""

from __future__ import annotations

from stage_fixtures import SAMPLE, quick_train, tiny_checkpoint

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
