"""Spam classification helpers (book ch. 6): parsing, balancing, splits, padding, heads, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.classify import (
    balance,
    classification_loss,
    classification_report,
    confusion_matrix,
    encode_padded,
    parse_labeled_tsv,
    predict,
    set_trainable,
    split,
    to_classifier,
)
from gptlab.cli import main as cli_main
from gptlab.config import GPTConfig
from gptlab.load import load_checkpoint
from gptlab.lora import apply_lora, count_parameters, lora_config, mark_trainable
from gptlab.model import GPT
from gptlab.tokenizer import EOT_ID, encode

LABELS = ("ham", "spam")


def test_parse_tsv_and_errors_name_the_line() -> None:
    rows = parse_labeled_tsv("ham\thello there\nspam\tWIN £100 now\n\n", labels=LABELS, source="sms.tsv")
    assert rows == [(0, "hello there"), (1, "WIN £100 now")]
    with pytest.raises(ValueError, match=r"sms\.tsv: line 2: unknown label 'eggs'"):
        parse_labeled_tsv("ham\tok\neggs\tx\n", labels=LABELS, source="sms.tsv")
    with pytest.raises(ValueError, match=r"sms\.tsv: line 1: expected 'label<TAB>text'"):
        parse_labeled_tsv("ham no tab\n", labels=LABELS, source="sms.tsv")


def test_balance_undersamples_majority_deterministically() -> None:
    data = [(0, f"ham {i}") for i in range(30)] + [(1, f"spam {i}") for i in range(7)]
    a, b = balance(data, seed=1), balance(data, seed=1)
    assert a == b and len(a) == 14
    assert sum(y for y, _ in a) == 7
    assert all(x in data for x in a)
    assert balance(data, seed=2) != a


def test_split_70_10_20_like_the_book() -> None:
    data = list(range(1494))  # the book's balanced dataset: 747 spam + 747 ham
    train, val, test = split(data, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the book's split sizes
    assert sorted(train + val + test) == data
    assert split(data, seed=123) == (train, val, test)


def test_encode_padded_truncates_and_pads_with_eot() -> None:
    ids = encode_padded(["Hi", "a much longer message than the other"], encode, max_length=4, pad_id=EOT_ID)
    assert ids.shape == (2, 4)
    assert ids[0].tolist() == [17250, EOT_ID, EOT_ID, EOT_ID]
    assert ids[1].tolist() == encode("a much longer message than the other")[:4]


@pytest.fixture
def lm() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("gpt-nano"))


def test_to_classifier_keeps_the_body(lm: GPT) -> None:
    clf = to_classifier(lm, 2)
    assert clf.config.num_classes == 2 and clf.lm_head.weight.shape == (2, 16)
    for name, tensor in lm.state_dict().items():
        if not name.startswith("lm_head"):
            assert torch.equal(tensor, clf.state_dict()[name]), name


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("head", lambda m: 16 * 2 + 2),
        ("last_block", lambda m: 16 * 2 + 2 + sum(p.numel() for p in m.transformer.h[-1].parameters()) + 32),
        ("all", lambda m: m.num_params()),
    ],
)
def test_trainable_parts(lm: GPT, mode: str, expected) -> None:
    clf = to_classifier(lm, 2)
    set_trainable(clf, mode)
    trainable, total = count_parameters(clf)
    assert trainable == expected(clf) and total == clf.num_params()
    clf(torch.zeros(2, 5, dtype=torch.long)).sum().backward()
    for name, p in clf.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_set_trainable_rejects_unknown_mode(lm: GPT) -> None:
    with pytest.raises(ValueError, match="trainable must be one of head, last_block, all, lora"):
        set_trainable(to_classifier(lm, 2), "some")


def test_loss_uses_the_last_position(lm: GPT) -> None:
    clf = to_classifier(lm, 2).eval()
    x = torch.randint(0, 256, (3, 6))
    y = torch.tensor([0, 1, 1])
    expected = torch.nn.functional.cross_entropy(clf(x)[:, -1, :], y)
    torch.testing.assert_close(classification_loss(clf, (x, y)), expected)
    probs = predict(clf, x)
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_confusion_matrix_and_report_hand_computed() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    preds = torch.tensor([0, 0, 1, 1, 1, 1, 0])
    cm = confusion_matrix(labels, preds, 2)
    assert cm.tolist() == [[2, 1], [1, 3]]
    report = classification_report(cm, LABELS)
    assert report["accuracy"] == pytest.approx(5 / 7)
    spam = report["per_class"]["spam"]
    assert spam["precision"] == pytest.approx(3 / 4) and spam["recall"] == pytest.approx(3 / 4)
    ham = report["per_class"]["ham"]
    assert ham["precision"] == pytest.approx(2 / 3) and ham["recall"] == pytest.approx(2 / 3)
    assert ham["f1"] == pytest.approx(2 / 3) and ham["support"] == 3


def test_lora_classifier_checkpoint_kept_separate_round_trips(lm: GPT, tmp_path) -> None:
    clf = to_classifier(lm, 2)
    apply_lora(clf, rank=2, alpha=4.0)
    mark_trainable(clf, also=("lm_head",))
    with torch.no_grad():
        for name, p in clf.named_parameters():
            if "lora_B" in name:
                p.normal_()
    meta = {"labels": list(LABELS), "max_length": 8, "lora": lora_config(clf), "lora_merged": False}
    save_checkpoint(clf, tmp_path / "ck", meta=meta)
    loaded, _ = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(loaded(x), clf.eval()(x))
    assert lora_config(loaded) == lora_config(clf)


def test_cli_classify(lm: GPT, tmp_path, capsys) -> None:
    clf = to_classifier(GPT(GPTConfig.from_name("gpt-micro", n_layer=1)), 2)
    save_checkpoint(clf, tmp_path / "clf", meta={"labels": list(LABELS), "max_length": 12})
    assert (
        cli_main(["classify", "--checkpoint", str(tmp_path / "clf"), "You won a prize!", "see you at 8"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    probs = predict(
        clf, encode_padded(["You won a prize!", "see you at 8"], encode, max_length=12, pad_id=EOT_ID)
    )
    for line, p in zip(lines, probs, strict=True):
        label, prob, _ = line.split("\t")
        assert label == LABELS[int(p.argmax())] and float(prob) == pytest.approx(float(p.max()), abs=1e-4)
    save_checkpoint(lm, tmp_path / "lm")
    assert cli_main(["classify", "--checkpoint", str(tmp_path / "lm"), "x"]) == 2
    assert "not a classifier checkpoint" in capsys.readouterr().err


def test_csv_quoting_reads_like_pandas_read_csv() -> None:
    text = 'ham\t"quoted" start\nspam\t"runs on\nham\tto here" end\nham\tplain\n'
    assert parse_labeled_tsv(text, labels=LABELS) == [
        (0, '"quoted" start'),
        (1, '"runs on'),
        (0, 'to here" end'),
        (0, "plain"),
    ]
    # CSV rules: a field opening with a quote runs to the closing quote, across the line break.
    assert parse_labeled_tsv(text, labels=LABELS, quoting=True) == [
        (0, "quoted start"),
        (1, "runs on\nham\tto here end"),
        (0, "plain"),
    ]
    with pytest.raises(ValueError, match="sms.tsv: line 4: expected 'label<TAB>text'"):
        parse_labeled_tsv('ham\t"a\nb"\n\nspam\n', labels=LABELS, source="sms.tsv", quoting=True)
    # pandas refuses a quote that never closes ("EOF inside string"); so do we, naming where it opened.
    with pytest.raises(ValueError, match="sms.tsv: line 2: a quote opened here is never closed"):
        parse_labeled_tsv('ham\tok\nham\t"open\nspam\tok\n', labels=LABELS, source="sms.tsv", quoting=True)


def test_balance_is_the_books_pandas_sample_order() -> None:
    # create_balanced_dataset: ham.sample(len(spam), random_state=seed) (RandomState's permutation prefix,
    # in that order), then all spam in file order.
    data = [(0, f"ham {i}") for i in range(6)] + [(1, f"spam {i}") for i in range(3)]
    perm = np.random.RandomState(123).permutation(6)[:3]
    assert balance(data, seed=123) == [(0, f"ham {i}") for i in perm] + data[6:]


def test_torch_default_head_is_a_fresh_linear_after_the_seed(lm: GPT) -> None:
    torch.manual_seed(7)
    expected = torch.nn.Linear(lm.config.n_embd, 2)
    torch.manual_seed(7)
    clf = to_classifier(lm, 2, head_init="torch_default")
    assert torch.equal(clf.lm_head.weight, expected.weight) and torch.equal(clf.lm_head.bias, expected.bias)
    for name, tensor in lm.state_dict().items():
        if not name.startswith("lm_head."):
            assert torch.equal(clf.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="head_init"):
        to_classifier(lm, 2, head_init="zeros")
