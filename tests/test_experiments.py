"""Comparing runs: two pipeline executions with different params and a `dvc exp run --queue` sweep, all
logged to a real `mlflow server` (SQLite backend, loopback) and checked over its REST API."""

from __future__ import annotations

import json
from pathlib import Path

import background
import pytest
from clones import TINY_PARAMS as TINY
from clones import clean_env, make_clone, run, set_params

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]  # the session run's worker
UPSTREAM = ["download", "tokenize", "pretrain"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with background.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def _search(url: str, experiment_id: str, filter_string: str) -> list[dict]:
    return background.mlflow_api(
        url, "runs/search", {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 500}
    ).get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = make_clone(tmp_path_factory.mktemp("exp") / "gptlab")
    set_params(root, TINY)
    from clones import git

    git("commit", "-qam", "tiny params", cwd=root)
    return root


def test_two_executions_side_by_side_in_mlflow(mlflow_server: str, prefect_server: str, clone: Path) -> None:
    # The session's Prefect server records the flows (a temporary one per run would cost ~30 s each to start).
    env = clean_env(clone, MLFLOW_TRACKING_URI=mlflow_server, PREFECT_API_URL=prefect_server)
    run(["./run.sh", "pipeline", "--target", "pretrain"], clone, env)
    run(
        ["./run.sh", "pipeline", "--target", "pretrain", "--set-param", "pretrain.train.lr=0.002"], clone, env
    )
    run(["git", "checkout", "params.yaml"], clone, env)

    exp_id = background.mlflow_api(mlflow_server, "experiments/get-by-name?experiment_name=gptlab")[
        "experiment"
    ]["experiment_id"]
    parents = _search(mlflow_server, exp_id, "tags.`gptlab.role` = 'pipeline'")
    assert len(parents) == 2
    children = {}
    for parent in parents:
        rid = parent["info"]["run_id"]
        kids = _search(mlflow_server, exp_id, f"tags.`mlflow.parentRunId` = '{rid}'")
        children[rid] = {_tags(k)["gptlab.stage"]: k for k in kids}
        assert all(
            _tags(k)["gptlab.pipeline_run_id"] == _tags(parent)["gptlab.pipeline_run_id"] for k in kids
        )
        assert _tags(parent)["prefect.flow_run_id"]
    first, second = sorted(children.values(), key=len, reverse=True)
    assert sorted(first) == sorted(UPSTREAM)  # everything ran the first time
    assert sorted(second) == ["pretrain"]  # only what the lr change invalidates
    assert (
        _params(first["pretrain"])["train.lr"] == "0.001"
        and _params(second["pretrain"])["train.lr"] == "0.002"
    )
    losses = [
        {m["key"]: m["value"] for m in run["data"]["metrics"]}["final_val_loss"]
        for run in (first["pretrain"], second["pretrain"])
    ]
    assert losses[0] != losses[1]


@pytest.mark.xdist_group("sweep")  # no Prefect: it need not wait for the session run's worker
def test_dvc_exp_queue_sweep_is_listed_and_tracked(mlflow_server: str, clone: Path) -> None:
    # The sweep's subject is DVC's queue and the runs it records, not training: a tokenize param keeps each
    # experiment to download (restored from DVC's run cache after the first) and tokenize.
    env = clean_env(clone, MLFLOW_TRACKING_URI=mlflow_server)
    for fraction in ("0.2", "0.3"):
        run(
            ["dvc", "exp", "run", "--queue", "-S", f"tokenize.val_fraction={fraction}", "tokenize"],
            clone,
            env,
        )
    run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], clone, env, timeout=900)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], clone, env).stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    fractions = set()
    for exp in exps:
        for e in exp.get("revs", []):
            data = e.get("data") or {}
            fraction = (
                data.get("params", {})
                .get("params.yaml", {})
                .get("data", {})
                .get("tokenize", {})
                .get("val_fraction")
            )
            metrics = data.get("metrics", {}).get("metrics/tokenize.json", {}).get("data", {})
            if fraction is not None and metrics:
                fractions.add(fraction)
                # the experiment's own split: its validation share of the tokens is the fraction it was run with
                assert metrics["val_tokens"] / metrics["num_tokens"] == pytest.approx(fraction, abs=0.01)
    assert {0.2, 0.3} <= fractions

    exp_id = background.mlflow_api(mlflow_server, "experiments/get-by-name?experiment_name=gptlab")[
        "experiment"
    ]["experiment_id"]
    tagged = _search(mlflow_server, exp_id, "tags.`dvc.exp_name` != '' and tags.`gptlab.stage` = 'tokenize'")
    assert {_params(r)["val_fraction"] for r in tagged} >= {"0.2", "0.3"}
    names = {_tags(r)["dvc.exp_name"] for r in tagged}
    assert len(names) >= 2
    for r in tagged:  # each experiment's stages nest under that experiment's parent run
        parent = background.mlflow_api(mlflow_server, f"runs/get?run_id={_tags(r)['mlflow.parentRunId']}")[
            "run"
        ]
        assert _tags(parent)["gptlab.pipeline_run_id"] == f"exp-{_tags(r)['dvc.exp_name']}"
