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
