"""params.yaml, the profiles, the stage dataclasses and dvc.yaml agree; bad params are named."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from stages.params import ParamsError, from_dict, load_section, read_params

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = list(DVC["stages"])
TOP_LEVEL = {"profile"}  # informational keys that are not a stage section


def params_class(stage: str) -> type:
    module = importlib.import_module(f"stages.{stage}")
    name = "".join(part.title() for part in stage.split("_")) + "Params"
    return getattr(module, name)


def test_params_yaml_is_the_sample_profile() -> None:
    assert (REPO / "params.yaml").read_text() == (REPO / "profiles" / "sample.yaml").read_text()


@pytest.mark.parametrize("profile", ["sample", "book"])
def test_every_section_matches_its_dataclass_exactly(profile: str) -> None:
    data = read_params(REPO / "profiles" / f"{profile}.yaml")
    assert set(data) - TOP_LEVEL == set(STAGES)
    for stage in STAGES:
        cls = params_class(stage)
        fields = {f.name for f in dataclasses.fields(cls)}
        # every field spelled out in the profile (no silent defaults), and nothing unknown
        assert set(data[stage]) == fields, stage
        load_section(stage, cls, REPO / "profiles" / f"{profile}.yaml")


def test_dvc_stages_track_exactly_their_section() -> None:
    for stage, spec in DVC["stages"].items():
        assert spec["params"] == [stage], stage
        assert spec["cmd"].startswith(f"python -m stages.{stage} "), stage
        assert f"stages/{stage}.py" in spec["deps"], stage


def test_missing_unknown_and_mistyped_keys(tmp_path) -> None:
    from stages.pretrain import PretrainParams

    base = yaml.safe_load((REPO / "params.yaml").read_text())

    def load(mutate):
        data = yaml.safe_load(yaml.safe_dump(base))
        mutate(data["pretrain"])
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
        return load_section("pretrain", PretrainParams, tmp_path / "params.yaml")

    with pytest.raises(ParamsError, match=r"pretrain: unknown key\(s\) learning_rate"):
        load(lambda p: p.update(learning_rate=1))
    with pytest.raises(ParamsError, match=r"pretrain\.train\.lr: expected a number, got 'fast'"):
        load(lambda p: p["train"].update(lr="fast"))
    with pytest.raises(ParamsError, match=r"pretrain\.batch_size: expected an integer, got 2\.5"):
        load(lambda p: p.update(batch_size=2.5))
    with pytest.raises(ParamsError, match=r"pretrain\.train: warmup_steps must be in \[0, max_steps\]"):
        load(lambda p: p["train"].update(warmup_steps=10_000))
    with pytest.raises(ParamsError, match=r"params\.yaml: missing section 'pretrain'"):
        (tmp_path / "params.yaml").write_text("profile: x\n")
        load_section("pretrain", PretrainParams, tmp_path / "params.yaml")


def test_required_field_without_default_is_reported() -> None:
    @dataclasses.dataclass
    class P:
        a: int
        b: list[float] | None = None

    with pytest.raises(ParamsError, match=r"s\.a: missing"):
        from_dict(P, {}, "s")
    assert from_dict(P, {"a": 1, "b": [1, 2]}, "s") == P(1, [1.0, 2.0])
    assert from_dict(P, {"a": 1, "b": ["5e-5"]}, "s") == P(1, [5e-5])  # PyYAML reads 5e-5 as a string
    with pytest.raises(ParamsError, match=r"s\.b\[1\]: expected a number"):
        from_dict(P, {"a": 1, "b": [1, "x"]}, "s")
