"""The Prefect flow runs DVC's stages in DVC's order, one task run per stage, with metrics artifacts.

The session's shared ``./run.sh pipeline`` run (conftest.py) ran the flow on the session's Prefect server; these
tests read that flow run back through Prefect's API, and run the flow in this process on copies.
"""

from __future__ import annotations

import json

import pytest
from clones import TINY_PARAMS, make_clone, set_params
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)

from pipelines.flow import pipeline
from pipelines.graph import dvc_stages

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]  # the session run's worker
STAGES = [
    "download", "tokenize", "pretrain", "base_model", "classify", "sft", "dpo", "benchmark", "evaluate", "export"
]  # fmt: skip


@pytest.fixture
def in_clone(monkeypatch):
    """Run flows in this process as the pipeline would: in the clone, no outer tracking server or run id."""
    for var in ("MLFLOW_TRACKING_URI", "GPTLAB_PIPELINE_RUN_ID"):
        monkeypatch.delenv(var, raising=False)

    def enter(root):
        monkeypatch.chdir(root)
        return root

    return enter


def test_stage_order_comes_from_dvc(sample_run, in_clone) -> None:
    clone = in_clone(sample_run.root)  # reads only
    assert [s["name"] for s in dvc_stages(clone)] == STAGES
    assert [s["name"] for s in dvc_stages(clone, "tokenize")] == ["download", "tokenize"]
    assert dvc_stages(clone, "pretrain")[-1]["metrics"] == ["metrics/pretrain.json"]
    assert [s["work"] for s in dvc_stages(clone, "pretrain")] == [[], [], ["work/pretrain"]]
    with pytest.raises(ValueError, match="unknown stage 'train'.*download, tokenize"):
        dvc_stages(clone, "train")


def flow_run_id(root) -> str:
    """The flow run that logged the clone's stage runs (each stage run carries its id as an MLflow tag)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gptlab")
    ids = {r.data.tags["prefect.flow_run_id"] for r in client.search_runs([exp.experiment_id])}
    (flow_run,) = ids
    return flow_run


def test_flow_records_one_task_run_per_stage(sample_run, tmp_path, in_clone) -> None:
    run_id = flow_run_id(sample_run.root)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
        assert client.read_flow(flow_run.flow_id).name == "gptlab-pipeline"
        assert flow_run.state.is_completed()
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        assert sorted(t.name for t in task_runs) == sorted(STAGES)
        assert all(t.state.is_completed() for t in task_runs)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert {
        "download-metrics",
        "tokenize-metrics",
        "pretrain-metrics",
        "base-model-metrics",
        "dpo-metrics",
    } <= set(by_key)
    table = by_key["pretrain-metrics"].data
    steps = [
        row for row in (json.loads(table) if isinstance(table, str) else table) if row["metric"] == "steps"
    ]
    assert steps == [{"metric": "steps", "value": TINY_PARAMS["pretrain"]["train"]["max_steps"]}]

    # The LoRA classifier was saved with its adapters kept separate; it loads back as such.
    from gptlab.load import load_checkpoint
    from gptlab.lora import lora_config

    classifier, config = load_checkpoint(sample_run.root / "models" / "classifier")
    assert config["meta"]["lora_merged"] is False and lora_config(classifier) == config["meta"]["lora"]

    # The flow in this process, on part of the graph: DVC's cache makes both tasks no-ops.
    clone = in_clone(sample_run.copy(tmp_path / "gptlab"))
    again = pipeline(root=str(clone), target="tokenize")
    assert [(r["stage"], r["ran"]) for r in again] == [("download", False), ("tokenize", False)]


def test_failing_stage_fails_the_flow_with_its_error(prefect_server, tmp_path, in_clone) -> None:
    clone = in_clone(make_clone(tmp_path / "gptlab"))
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
