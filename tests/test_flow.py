"""The Prefect flow runs DVC's stages in DVC's order, one task run per stage, with metrics artifacts."""

from __future__ import annotations

import pytest
from clones import TINY_PARAMS, make_clone, set_params
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from pipelines.flow import pipeline
from pipelines.graph import dvc_stages

pytestmark = pytest.mark.slow
STAGES = ["download", "tokenize", "pretrain", "base_model", "classify", "sft", "dpo", "evaluate", "export"]


@pytest.fixture
def clone(tmp_path, monkeypatch):
    root = make_clone(tmp_path / "gptlab")
    set_params(root, TINY_PARAMS)
    for var in ("MLFLOW_TRACKING_URI", "GPTLAB_PIPELINE_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(root)
    return root


def test_stage_order_comes_from_dvc(clone) -> None:
    assert [s["name"] for s in dvc_stages(clone)] == STAGES
    assert [s["name"] for s in dvc_stages(clone, "tokenize")] == ["download", "tokenize"]
    assert dvc_stages(clone, "pretrain")[-1]["metrics"] == ["metrics/pretrain.json"]
    assert [s["work"] for s in dvc_stages(clone, "pretrain")] == [[], [], ["work/pretrain"]]
    with pytest.raises(ValueError, match="unknown stage 'train'.*download, tokenize"):
        dvc_stages(clone, "train")


def test_flow_records_one_task_run_per_stage(prefect_server, clone) -> None:
    state = pipeline(root=str(clone), return_state=True)
    results = state.result()
    assert [r["stage"] for r in results] == STAGES and all(r["ran"] for r in results)
    assert results[2]["metrics"]["steps"] == 4
    with get_client(sync_client=True) as client:
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        task_runs = client.read_task_runs(flow_run_filter=flow_filter)
        assert sorted(t.name for t in task_runs) == sorted(STAGES)
        assert all(t.state.is_completed() for t in task_runs)
        keys = {a.key for a in client.read_artifacts()}
    assert {
        "download-metrics",
        "tokenize-metrics",
        "pretrain-metrics",
        "base-model-metrics",
        "dpo-metrics",
    } <= keys

    # The LoRA classifier was saved with its adapters kept separate; it loads back as such.
    from gptlab.checkpoint import load_checkpoint
    from gptlab.lora import lora_config

    classifier, config = load_checkpoint(clone / "models" / "classifier")
    assert config["meta"]["lora_merged"] is False and lora_config(classifier) == config["meta"]["lora"]

    # Second run of part of the graph: DVC's cache makes both tasks no-ops.
    again = pipeline(root=str(clone), target="tokenize")
    assert [(r["stage"], r["ran"]) for r in again] == [("download", False), ("tokenize", False)]


def test_failing_stage_fails_the_flow_with_its_error(prefect_server, clone) -> None:
    set_params(clone, {"download": {"sources": {"corpus.txt": {"sha256": "0" * 64}}, "retries": 1}})
    state = pipeline(root=str(clone), target="download", return_state=True)
    assert state.is_failed()
    with pytest.raises(
        RuntimeError, match=r"stage download failed: download: error: sha256 mismatch for data/sample"
    ):
        state.result()
    with get_client(sync_client=True) as client:
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        (task_run,) = client.read_task_runs(flow_run_filter=flow_filter)
    assert task_run.run_count == 3  # the download task retried twice
