"""Instruction data: validation, seeded splits, the SFT collate function and the model's test-set answers.

Book ch. 7: the 85/10/5 train/test/validation split, ``custom_collate_fn`` (pad with ``<|endoftext|>``, shift
targets by one, ignore every padding target but the first, optional truncation) plus the exercise that masks the
prompt tokens out of the loss, and "Extracting and saving responses" (:func:`generate_responses`). The prompts
themselves (the Alpaca format, chat templates) are :mod:`gptlab.prompts`'.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from decimal import Decimal
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from gptlab.batches import Splits
from gptlab.errors import UserError
from gptlab.generate import generate
from gptlab.model import GPT

T = TypeVar("T")


def _field_names(name: str, value: object) -> tuple[str, ...]:
    # A bare string is a Sequence[str] too, and required="output" would silently check 'o', 'u', 't', ...
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):  # type: ignore[union-attr]
        raise TypeError(f"{name} must be a sequence of field names, got {value!r}")
    return tuple(value)  # type: ignore[arg-type]


def _record_problem(record: object, fields: Sequence[str], non_empty: set[str]) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object with fields {', '.join(map(repr, fields))}, got {type(record).__name__}"
    for key in fields:
        if key not in record:
            return f"field {key!r} is missing"
        value = record[key]
        if not isinstance(value, str):
            return f"field {key!r} must be a string, got {type(value).__name__}"
        if key in non_empty and not value.strip():
            return f"field {key!r} is empty"
    return None


def validate_records(
    records: object,
    *,
    required: Sequence[str] = ("instruction", "input", "output"),
    non_empty: Sequence[str] = ("instruction", "output"),
    skip_invalid: bool = False,
    source: str = "records",
) -> tuple[list[dict], int]:
    """Check parsed JSON records; return ``(valid records, number skipped)``.

    ``records`` must be a list of dicts. Each needs every ``required`` key (and every ``non_empty`` key) with a
    str value; ``non_empty`` keys must also hold more than whitespace (the book's ``input`` may be ``""``).
    An invalid record raises ``ValueError("<source>: record <i>: field 'output' is missing")`` (also
    ``is empty`` / ``must be a string``; ``i`` is the 0-based position in ``records``) unless ``skip_invalid``,
    in which case it is dropped and counted. Valid records are returned as they are, extra keys included.
    """
    fields = _field_names("required", required)
    blank_checked = _field_names("non_empty", non_empty)
    fields += tuple(k for k in blank_checked if k not in fields)
    if not isinstance(records, list):
        raise UserError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    valid: list[dict] = []
    skipped = 0
    for i, record in enumerate(records):
        problem = _record_problem(record, fields, set(blank_checked))
        if problem is None:
            valid.append(record)
        elif skip_invalid:
            skipped += 1
        else:
            raise UserError(f"{source}: record {i}: {problem}")
    return valid, skipped


def _fraction(name: str, value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise UserError(f"{name} must be a number in [0, 1], got {value!r}")
    # As written (0.85, not 0.84999999999999997...), the same rule as gptlab.data's train/val split.
    return Decimal(repr(float(value)))


def split_records(
    records: Sequence[T],
    *,
    train_frac: float = 0.85,
    test_frac: float = 0.10,
    seed: int = 123,
    shuffle: bool = True,
) -> Splits[T]:
    """Seeded shuffle (unless ``shuffle`` is false: the book's ch. 7 splits in file order), then the book's
    split, returned as :class:`~gptlab.batches.Splits` ``(train, val, test)``.

    train is the first ``floor(n * train_frac)`` records, test the next ``floor(n * test_frac)``, val the rest
    (1100 records give 935 / 110 / 55), as the book cuts them. The shuffle uses its own ``random.Random(seed)``: ``gptlab.train``
    reseeds the global RNG, and the split must not depend on what ran before it.
    """
    train_d, test_d = _fraction("train_frac", train_frac), _fraction("test_frac", test_frac)
    if train_d + test_d > 1:
        raise UserError(f"train_frac + test_frac must be at most 1, got {train_frac} + {test_frac}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an int, got {seed!r}")
    shuffled = list(records)
    if shuffle:
        random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n_train = math.floor(train_d * n)
    n_test = math.floor(test_d * n)
    train, test = shuffled[:n_train], shuffled[n_train : n_train + n_test]
    return Splits(train=train, val=shuffled[n_train + n_test :], test=test)


def collate_sft(
    batch: Sequence[tuple[list[int], int]],
    *,
    pad_id: int = 50256,
    ignore_index: int = -100,
    allowed_max_length: int | None = None,
    mask_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's ``custom_collate_fn`` over ``(ids, prompt_len)`` items; int64 ``(inputs, targets)`` (B, T).

    Each sequence gets one ``pad_id`` appended (the end-of-text the model must learn to emit) and is padded
    with ``pad_id`` to the batch's longest + 1; inputs drop the last column, targets the first. Padding
    targets after that first end-of-text become ``ignore_index``. The mask is by position, not by value as
    in the book, so a real ``pad_id`` token inside a sequence (an ``<|endoftext|>`` in a response) stays
    scored. With ``mask_prompt`` the targets that predict prompt tokens (target positions
    ``0 .. prompt_len - 2``) are ignored too: the model still reads the prompt, it is just not trained to
    reproduce it. Inputs and targets are then cut to ``allowed_max_length`` columns.
    """
    if not batch:
        raise ValueError("collate_sft got an empty batch")
    if allowed_max_length is not None and (
        isinstance(allowed_max_length, bool)
        or not isinstance(allowed_max_length, int)
        or allowed_max_length < 1
    ):
        raise UserError(f"allowed_max_length must be a positive int or None, got {allowed_max_length!r}")
    for i, (ids, prompt_len) in enumerate(batch):
        if len(ids) == 0:
            raise ValueError(f"collate_sft: sequence {i} is empty")
        if not 0 <= prompt_len <= len(ids):
            raise ValueError(f"collate_sft: sequence {i} has prompt_len {prompt_len} outside [0, {len(ids)}]")
    width = max(len(ids) for ids, _ in batch) + 1
    padded = torch.full((len(batch), width), pad_id, dtype=torch.int64)  # (B, T + 1)
    for row, (ids, _) in enumerate(batch):
        padded[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    inputs = padded[:, :-1].clone()  # (B, T)
    targets = padded[:, 1:].clone()  # (B, T)
    for row, (ids, prompt_len) in enumerate(batch):
        # targets[j] is token j + 1: target len(ids) - 1 is the appended end-of-text, the rest is padding.
        targets[row, len(ids) :] = ignore_index
        if mask_prompt:
            targets[row, : max(prompt_len - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs = inputs[:, :allowed_max_length]
        targets = targets[:, :allowed_max_length]
    return inputs, targets


def generate_responses(
    model: GPT,
    entries: Sequence[dict],
    prompter,
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool | None = None,
) -> list[str]:
    """Greedy answers (KV cache, stop at the prompt style's end token) to each record, batched with left
    padding. A prompt is cut from the left so that prompt and answer fit the context window."""
    keep = max(1, model.config.context_length - max_new_tokens)
    responses: list[str] = []
    starts = range(0, len(entries), batch_size)
    for start in tqdm(
        starts, desc="respond", unit="batch", disable=None if progress is None else not progress
    ):
        prompts = [prompter.prompt_ids(e)[-keep:] for e in entries[start : start + batch_size]]
        outs = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=prompter.stop_ids,
            generator=torch.Generator(),
        )
        responses += [prompter.response_text(o) for o in outs]
    return responses
