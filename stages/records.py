"""The book's instruction and preference records (ch. 7): read, validate, split."""

from __future__ import annotations

import json
from pathlib import Path

from gptlab.batches import Splits
from gptlab.errors import UserError
from gptlab.fileio import read_utf8
from gptlab.instruct import split_records, validate_records


def load_splits(
    path: Path,
    *,
    required: tuple[str, ...],
    skip_invalid: bool,
    train_frac: float,
    test_frac: float,
    seed: int,
    shuffle: bool = True,
) -> tuple[Splits[dict], int, int]:
    """Read and validate the book's JSON records (every field but ``input`` non-empty), then split them
    into train/test/validation (book ch. 7; shuffled first, seeded, unless ``shuffle`` is false); returns
    (splits, valid records, skipped)."""
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    non_empty = tuple(f for f in required if f != "input")
    records, skipped = validate_records(
        data, required=required, non_empty=non_empty, skip_invalid=skip_invalid, source=str(path)
    )
    parts = split_records(records, train_frac=train_frac, test_frac=test_frac, seed=seed, shuffle=shuffle)
    empty = [
        name
        for name, rows in (("train", parts.train), ("test", parts.test), ("validation", parts.val))
        if not rows
    ]
    if empty:
        raise UserError(
            f"{path}: {len(records)} records leave the {'/'.join(empty)} split empty "
            f"(train_frac={train_frac}, test_frac={test_frac}); add records or change the fractions"
        )
    return parts, len(records), skipped
