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


def test_mirror_is_written_into_the_copy_keeping_its_comments(repo: Path, tmp_path: Path) -> None:
    import yaml

    mirror = tmp_path / "copies"
    mirror.mkdir()
    profile.activate("book", repo, mirror=str(mirror))
    text = (repo / "params.yaml").read_text()
    assert yaml.safe_load(text)["download"]["mirror"] == str(mirror)
    assert "# ch. 5: train_ratio = 0.90" in text  # the profile's comments survive the edit
    source = (repo / "profiles" / "book.yaml").read_text()
    assert [ln for ln in text.splitlines() if "mirror" not in ln] == [
        ln for ln in source.splitlines() if "mirror" not in ln
    ]
    with pytest.raises(ValueError, match="not a directory"):
        profile.activate("book", repo, mirror=str(tmp_path / "missing"))


def test_overrides_keep_comments(repo: Path) -> None:
    profile.activate("book", repo)
    profile.apply_overrides(["pretrain.train.epochs=2"], repo)
    text = (repo / "params.yaml").read_text()
    assert "epochs: 2" in text and "# the book trains in float32" in text


def test_a_failed_switch_leaves_params_yaml_as_it_was(repo: Path, tmp_path: Path) -> None:
    text = (repo / "profiles" / "sample.yaml").read_text()
    (repo / "profiles" / "old.yaml").write_text(text.replace("  mirror: null\n", ""))
    before = (repo / "params.yaml").read_text()
    with pytest.raises(ValueError, match="no key 'download.mirror'"):
        profile.activate("old", repo, mirror=str(tmp_path))
    assert (repo / "params.yaml").read_text() == before
