"""The book's ch. 5 through the pipeline: book profile, offline from ``../shared/datasets``, ``dvc repro pretrain``.

GPT-2 124M (context 256, untied head, PyTorch's default initialisation), AdamW lr 4e-4 / wd 0.1 on every
parameter, 10 epochs of batch 2 over the-verdict.txt split 90/10 by characters, the DataLoader's shuffling and
the book's evaluation (train and val loss over 5 batches after steps 1, 6, 11, …). The book prints
``Train loss 9.781, Val loss 9.933`` after the first step and ``Train loss 0.391, Val loss 6.452`` at its last
evaluation; the greedy sample then recites the story. About five minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import difflib
import json
import sys
from pathlib import Path

import pytest
from clones import clean_env, make_clone, run

pytestmark = pytest.mark.slow


def longest_shared_passage(text: str, story: str) -> str:
    match = difflib.SequenceMatcher(None, text, story, autojunk=False).find_longest_match()
    return text[match.a : match.a + match.size]


def test_book_chapter_5_reproduces_through_dvc(shared_dir: Path, tmp_path: Path) -> None:
    clone = make_clone(tmp_path / "gptlab")
    env = clean_env(clone)
    run(
        [sys.executable, "-m", "pipelines.profile", "book", "--mirror", str(shared_dir / "datasets")],
        clone,
        env,
    )
    first = run(["dvc", "repro", "pretrain"], clone, env, timeout=1800)
    assert "Running stage 'pretrain'" in first.stdout

    metrics = json.loads((clone / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 90  # 9 batches of 2 x 256 tokens per epoch, 10 epochs
    assert metrics["train_loss"] < 1.0
    assert metrics["val_loss"] == pytest.approx(6.45, abs=0.4)

    with open(clone / "plots" / "pretrain" / "loss.csv") as f:
        evals = [r for r in csv.DictReader(f) if r["val_loss"]]
    # The book's first printed line, after one step: the same weights, batches and dropout masks.
    assert (int(evals[0]["step"]), float(evals[0]["train_loss"]), float(evals[0]["val_loss"])) == (
        1,
        pytest.approx(9.781, abs=1e-3),
        pytest.approx(9.933, abs=1e-3),
    )
    assert [int(r["step"]) for r in evals] == [*range(1, 90, 5), 90]

    story = (shared_dir / "datasets" / "the-verdict.txt").read_text(encoding="utf-8")
    [sample] = json.loads((clone / "outputs" / "pretrain" / "samples.json").read_text())
    passage = longest_shared_passage(sample["completion"], story)
    assert len(passage) >= 60, sample["completion"]  # memorised: a long verbatim stretch of the story

    second = run(["dvc", "repro", "pretrain"], clone, env)
    assert "Running stage" not in second.stdout
    for stage in ("download", "tokenize", "pretrain"):
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout
