"""Instruction data (book ch. 7): prompt format, record validation, split, tokenization, SFT collate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.instruct import collate_sft, split_records, validate_records
from gptlab.prompts import encode_record, format_input, format_response

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "instruction-data.json"
IGN = -100


def records(n: int = 4) -> list[dict]:
    return [
        {"instruction": f"Do task {i}.", "input": "" if i % 2 else f"x{i}", "output": f"y{i}"}
        for i in range(n)
    ]


# --- format_input / format_response -------------------------------------------------------------------------


def test_format_input_with_input_is_the_books_text():
    entry = {"instruction": "Identify the correct spelling.", "input": "Ocassion", "output": "Occasion"}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nIdentify the correct spelling.\n\n### Input:\nOcassion"
    )
    assert format_response(entry["output"]) == "\n\n### Response:\nOccasion"


def test_format_input_without_input_omits_the_input_section():
    entry = {"instruction": "Multiply 21 by 11.", "input": "", "output": "231"}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nMultiply 21 by 11."
    )


# --- validate_records ---------------------------------------------------------------------------------------


def test_validate_accepts_good_data_and_keeps_extra_keys():
    data = json.loads(SAMPLE.read_text())
    valid, skipped = validate_records(data, source=str(SAMPLE))
    assert (len(valid), skipped) == (len(data), 0)
    extra = [{"instruction": "a", "input": "", "output": "b", "rejected": "c"}]
    assert validate_records(extra) == (extra, 0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"instruction": "a", "input": ""}, "data.json: record 2: field 'output' is missing"),
        ({"instruction": "a", "input": "", "output": "  \n"}, "data.json: record 2: field 'output' is empty"),
        (
            {"instruction": "", "input": "", "output": "b"},
            "data.json: record 2: field 'instruction' is empty",
        ),
        (
            {"instruction": "a", "input": None, "output": "b"},
            "data.json: record 2: field 'input' must be a string",
        ),
        (
            {"instruction": "a", "input": "", "output": 3},
            "data.json: record 2: field 'output' must be a string",
        ),
        ("just text", "data.json: record 2: expected an object"),
    ],
)
def test_validate_names_record_index_and_field(bad, message):
    data = [*records(2), bad, *records(2)]
    with pytest.raises(ValueError, match=f"^{message}"):
        validate_records(data, source="data.json")


def test_validate_skip_invalid_counts_and_drops():
    good = records(3)
    data = [
        good[0],
        {"instruction": "a"},
        good[1],
        {"instruction": "a", "input": "", "output": ""},
        7,
        good[2],
    ]
    assert validate_records(data, skip_invalid=True) == (good, 3)


def test_validate_custom_fields():
    data = [{"prompt": "p", "chosen": "c"}]
    assert validate_records(data, required=("prompt", "chosen"), non_empty=("chosen",)) == (data, 0)
    with pytest.raises(ValueError, match="record 0: field 'rejected' is missing"):
        validate_records(data, required=("prompt",), non_empty=("chosen", "rejected"))
    with pytest.raises(TypeError, match="required"):
        validate_records(data, required="prompt")


@pytest.mark.parametrize("data", [{"instruction": "a"}, "[]", None, tuple(records(2))])
def test_validate_rejects_non_list(data):
    with pytest.raises(ValueError, match="^x.json: expected a JSON list of records"):
        validate_records(data, source="x.json")


# --- split_records -------------------------------------------------------------------------------------------


def test_split_sizes_match_the_book():
    train, val, test = split_records(list(range(1100)))
    assert (len(train), len(test), len(val)) == (935, 110, 55)


def test_split_is_a_seeded_partition():
    data = list(range(1100))
    a = split_records(data, seed=123)
    assert a == split_records(data, seed=123)
    assert a != split_records(data, seed=124)
    assert sorted(a[0] + a[1] + a[2]) == data
    assert a[0] != data[:935]  # shuffled, not the file order
    assert data == list(range(1100))  # input untouched


def test_split_ignores_the_global_rng():
    import random

    random.seed(0)
    a = split_records(list(range(50)))
    random.seed(1)
    assert split_records(list(range(50))) == a


def test_split_fraction_edges_and_validation():
    train, val, test = split_records(list(range(10)), train_frac=1.0, test_frac=0.0)
    assert (sorted(train), test, val) == (list(range(10)), [], [])
    assert split_records([], train_frac=0.5, test_frac=0.5) == ([], [], [])
    with pytest.raises(ValueError, match="train_frac"):
        split_records([1], train_frac=1.5)
    with pytest.raises(ValueError, match="test_frac"):
        split_records([1], test_frac=-0.1)
    with pytest.raises(ValueError, match=r"train_frac \+ test_frac"):
        split_records([1], train_frac=0.9, test_frac=0.2)


# --- encode_record ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_text", ["Nairobi", ""])
def test_encode_record_with_gpt2(gpt2_tiktoken_file, input_text):
    from gptlab.tokenizer import decode, encode

    entry = {
        "instruction": "Identify the country whose capital is given.",
        "input": input_text,
        "output": "Kenya.",
    }
    ids, prompt_len = encode_record(entry, encode)
    assert ids[:prompt_len] == encode(format_input(entry))
    assert 0 < prompt_len < len(ids)
    assert decode(ids) == format_input(entry) + format_response(entry["output"])


def test_encode_record_then_mask_prompt_scores_exactly_the_response(gpt2_tiktoken_file):
    from gptlab.tokenizer import EOT_ID, decode, encode

    entry = {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The night was dark.",
        "output": "Ink.",
    }
    ids, prompt_len = encode_record(entry, encode)
    x, y = collate_sft([(ids, prompt_len), (ids[:3], 1)], pad_id=EOT_ID, mask_prompt=True)
    scored = y[0][y[0] != IGN].tolist()
    assert (y[0, : prompt_len - 1] == IGN).all() and (y[0, prompt_len - 1 :] != IGN).all()
    assert scored[-1] == EOT_ID
    assert decode(scored[:-1]) == format_response(entry["output"])


def test_encode_record_gpt2_trailing_newline_is_rejected(gpt2_tiktoken_file):
    from gptlab.tokenizer import encode

    with pytest.raises(ValueError, match="not a prefix"):
        encode_record({"instruction": "Do it.", "input": "foo\n", "output": "ok"}, encode)


def test_encode_record_rejects_a_prompt_that_is_not_a_prefix():
    # A toy tokenizer whose last prompt token changes once the response follows, as BPE does with a
    # trailing newline merging into the response header's "\n\n".
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text.replace("\n\n\n", "\x01")]

    entry = {"instruction": "a", "input": "b\n", "output": "c"}
    with pytest.raises(ValueError, match="not a prefix"):
        encode_record(entry, encode)


# --- collate_sft ------------------------------------------------------------------------------------------------


def book_collate(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
    """The book's custom_collate_fn (ch. 7), verbatim but for the device argument."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


BATCH = [([1, 2, 3, 4, 5], 3), ([6, 7], 1), ([8], 1)]


def test_collate_pads_shifts_and_keeps_only_the_first_pad_target():
    x, y = collate_sft(BATCH)
    E = 50256
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, E, E, E], [8, E, E, E, E]]
    assert y.tolist() == [[2, 3, 4, 5, E], [7, E, IGN, IGN, IGN], [E, IGN, IGN, IGN, IGN]]


def test_collate_small_pad_id():
    x, y = collate_sft([([1, 2, 3], 1), ([4, 5], 1)], pad_id=0, ignore_index=-1)
    assert x.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert y.tolist() == [[2, 3, 0], [5, 0, -1]]


def test_collate_mask_prompt_masks_exactly_the_prompt_predicting_targets():
    batch = [*BATCH, ([6, 7], 2)]
    x, y = collate_sft(batch, pad_id=0, mask_prompt=True)
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 0, 0, 0, 0], [6, 7, 0, 0, 0]]
    assert y.tolist() == [
        [IGN, IGN, 4, 5, 0],  # prompt 1 2 3: the targets 2 and 3 are not scored, 4 onward are
        [7, 0, IGN, IGN, IGN],  # prompt_len 1: token 1 is never a target, nothing to mask
        [0, IGN, IGN, IGN, IGN],
        [IGN, 0, IGN, IGN, IGN],  # all prompt: only the end-of-text is scored
    ]


def test_collate_truncates_after_masking():
    x, y = collate_sft(BATCH, pad_id=0, allowed_max_length=3)
    assert x.tolist() == [[1, 2, 3], [6, 7, 0], [8, 0, 0]]
    assert y.tolist() == [[2, 3, 4], [7, 0, IGN], [0, IGN, IGN]]
    x2, y2 = collate_sft(BATCH, pad_id=0, allowed_max_length=100)
    assert x2.shape == y2.shape == (3, 5)


def test_collate_keeps_a_real_pad_token_inside_a_sequence():
    x, y = collate_sft([([1, 0, 2], 1), ([3], 1)], pad_id=0)
    assert x.tolist() == [[1, 0, 2], [3, 0, 0]]
    assert y.tolist() == [[0, 2, 0], [0, IGN, IGN]]  # the book's value-based mask would ignore y[0, 2]


def test_collate_matches_the_book_without_inner_pads():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        seqs = [
            torch.randint(1, 50256, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 9, (4,), generator=g)
        ]
        for limit in (None, 4):
            x, y = collate_sft([(s, 1) for s in seqs], allowed_max_length=limit)
            bx, by = book_collate(seqs, allowed_max_length=limit)
            assert torch.equal(x, bx) and torch.equal(y, by)


def test_collate_rejects_bad_batches():
    with pytest.raises(ValueError, match="empty batch"):
        collate_sft([])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        collate_sft([([1], 1), ([], 0)])
    with pytest.raises(ValueError, match="prompt_len 3"):
        collate_sft([([1, 2], 3)])
    with pytest.raises(ValueError, match="allowed_max_length"):
        collate_sft([([1], 1)], allowed_max_length=0)
