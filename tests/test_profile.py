"""Switching profiles rewrites params.yaml from profiles/ and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines import profile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path) -> Path:
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_switch_and_back(repo: Path) -> None:
    assert profile.current(repo) == "sample"
    profile.activate("book", repo)
    assert profile.current(repo) == "book"
    assert (repo / "params.yaml").read_text() == (repo / "profiles" / "book.yaml").read_text()
    profile.activate("sample", repo)
    assert (repo / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["params.yaml", "profiles"]


def test_unknown_profile_lists_choices(repo: Path) -> None:
    with pytest.raises(ValueError, match="available: book, sample"):
        profile.activate("huge", repo)


def test_overrides_like_dvc_exp_run_set_param(repo: Path) -> None:
    import yaml

    profile.apply_overrides(
        ["pretrain.train.lr=0.003", "classify.trainable=lora", "tokenize.workers=1"], repo
    )
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["pretrain"]["train"]["lr"] == 0.003 and params["classify"]["trainable"] == "lora"
    assert params["tokenize"]["workers"] == 1
    with pytest.raises(ValueError, match="no key 'pretrain.train.learning_rate'"):
        profile.apply_overrides(["pretrain.train.learning_rate=1"], repo)
    with pytest.raises(ValueError, match="expected section.key=value"):
        profile.apply_overrides(["pretrain"], repo)
