"""Shared stage helpers: loading + splitting the book's JSON records with one-line errors."""

from __future__ import annotations

import json

import pytest

from stages.records import load_splits

REQUIRED = ("instruction", "input", "output")


def _write(tmp_path, records) -> object:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_splits_and_counts_skipped(tmp_path) -> None:
    good = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    path = _write(tmp_path, [*good, {"instruction": "x", "input": "", "output": " "}])
    (train, val, test), n, skipped = load_splits(
        path, required=REQUIRED, skip_invalid=True, train_frac=0.85, test_frac=0.1, seed=1
    )
    assert (len(train), len(test), len(val), n, skipped) == (34, 4, 2, 40, 1)
    with pytest.raises(ValueError, match=r"data\.json: record 40: field 'output' is empty"):
        load_splits(path, required=REQUIRED, skip_invalid=False, train_frac=0.85, test_frac=0.1, seed=1)


def test_too_few_records_and_bad_json_name_the_file(tmp_path) -> None:
    path = _write(tmp_path, [{"instruction": "a", "input": "", "output": "b"}] * 5)
    with pytest.raises(ValueError, match=r"data\.json: 5 records leave the test split empty"):
        load_splits(path, required=REQUIRED, skip_invalid=False, train_frac=0.85, test_frac=0.1, seed=1)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"data\.json: invalid JSON"):
        load_splits(path, required=REQUIRED, skip_invalid=False, train_frac=0.85, test_frac=0.1, seed=1)
