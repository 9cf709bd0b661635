"""The scheduled deployment (pipelines/deploy.py, prefect.yaml) against a real Prefect server.

The fast tests build the deployment offline. The end-to-end ones use the session's ``prefect server start``
(conftest.py) and, in a fresh clone with tiny params, ``python -m pipelines.deploy serve`` as a subprocess; they
read the deployment back through the client, trigger runs of short targets and check what the runs did, in
Prefect and in MLflow. That the flow runs every stage is the shared pipeline run's to show (test_flow.py).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from background import background, free_port, tail, wait_for
from clones import REPO, clean_env, make_clone, set_params
from clones import TINY_PARAMS as TINY
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, FlowRun, TaskRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from pipelines import deploy

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]  # the session run's worker
STAGES = ["download", "tokenize"]  # what the triggered runs run: the short target "tokenize"
BIN = Path(sys.executable).parent
SERVED = "test-deploy"
# Fewer optimizer steps in the three fine-tuning stages (TINY still runs a full epoch there), passed the way a
# user would vary a scheduled run: as --set-param overrides the flow applies at each run.
FAST = [
    f"{stage}.train.{key}={value}"
    for stage in ("classify", "sft", "dpo")
    for key, value in (("epochs", "null"), ("max_steps", "2"), ("eval_batches", "1"))
]


# ---------------------------------------------------------------- offline: arguments -> deployment object


def test_defaults_build_the_nightly_deployment() -> None:
    args = deploy.parse_args(["serve"])
    assert (args.name, args.cron, args.timezone, args.limit) == ("gptlab-nightly", "0 3 * * *", "UTC", 1)
    dep = deploy.build_deployment(args)
    assert (dep.flow_name, dep.name, dep.entrypoint) == (
        "gptlab-pipeline",
        "gptlab-nightly",
        deploy.ENTRYPOINT,
    )
    ((schedule,),) = [[s.schedule for s in dep.schedules]]
    assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "UTC")
    assert dep.concurrency_limit == 1
    assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert dep.parameters == {
        "root": str(REPO),
        "target": None,
        "force": False,
        "profile": None,
        "set_params": None,
        "push": None,
    }
    assert dep.work_pool_name is None  # served: no pool, no worker


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone for the checks that open the DVC repo (tests never touch the working tree's DVC state)."""
    return make_clone(tmp_path_factory.mktemp("offline") / "gptlab")


def test_options_reach_schedule_and_parameters(checkout: Path) -> None:
    argv = ["register", "--name", "n", "--cron", "*/5 * * * *", "--timezone", "Europe/Berlin"]
    argv += ["--target", "tokenize", "--profile", "book", "--set-param", "a.b=1", "--set-param", "c.d=x y"]
    argv += ["--push", "stack"]
    args = deploy.parse_args(argv)
    assert args.pool == deploy.DEFAULT_POOL
    deploy.validate(args, checkout)
    options = deploy.deployment_options(args, Path("/somewhere"))
    assert (options["schedules"][0].cron, options["schedules"][0].timezone) == (
        "*/5 * * * *",
        "Europe/Berlin",
    )
    assert options["parameters"] == {
        "root": "/somewhere",
        "target": "tokenize",
        "force": False,
        "profile": "book",
        "set_params": ["a.b=1", "c.d=x y"],
        "push": "stack",
    }
    assert options["concurrency_limit"].limit == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--profile", "huge"], r"unknown profile 'huge'; available: book, sample"),
        (["serve", "--set-param", "lr=1"], r"--set-param 'lr=1': expected section.key=value"),
        (["register", "--set-param", "pretrain.lr"], r"expected section.key=value"),
        (["serve", "--target", "train"], r"unknown stage 'train'; dvc.yaml has: download, tokenize"),
        (["serve", "--limit", "0"], r"--limit must be at least 1"),
    ],
)
def test_invalid_options_fail_at_registration_not_at_run_time(
    argv: list[str], message: str, checkout: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        deploy.validate(deploy.parse_args(argv), checkout)


def test_no_server_is_one_line_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.deploy", "serve", "--api-url", f"http://127.0.0.1:{port}/api"],
        cwd=REPO,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"deploy: error: no Prefect server at http://127.0.0.1:{port}/api (")
    assert line.endswith(
        "start one with `prefect server start` or point --api-url / PREFECT_API_URL at yours"
    )


def test_prefect_yaml_is_the_one_definition(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert config["build"] is None and config["push"] is None and "pull" not in config
    # deploy.py reads its deployment from prefect.yaml: an edit there is what `serve`/`register` deploy.
    edited = (REPO / "prefect.yaml").read_text().replace('cron: "0 3 * * *"', 'cron: "15 4 * * 1"')
    edited = edited.replace("limit: 1", "limit: 2").replace("tags: [gptlab, dvc]", "tags: [gptlab, nightly]")
    (tmp_path / "prefect.yaml").write_text(edited)
    spec = deploy.deployment_spec(tmp_path)
    assert spec["schedules"][0]["cron"] == "15 4 * * 1" and spec["concurrency_limit"]["limit"] == 2
    assert spec["tags"] == ["gptlab", "nightly"]
    assert deploy.deployment_spec() == deploy.SPEC
    options = deploy.deployment_options(deploy.parse_args(["register"]))
    assert options["parameters"] == {**deploy.SPEC["parameters"], "root": str(REPO)}
    assert options["concurrency_limit"].limit == deploy.SPEC["concurrency_limit"]["limit"]


# ---------------------------------------------------------------- end to end: server + served deployment


@dataclass
class Served:
    api: str
    clone: Path
    env: dict[str, str]
    log: Path

    @contextlib.contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings(updates={PREFECT_API_URL: self.api}), get_client(sync_client=True) as client:
            yield client

    def trigger(self, name: str = f"gptlab-pipeline/{SERVED}", **parameters: Any) -> UUID:
        with self.client() as client:
            dep = client.read_deployment_by_name(name)
            return client.create_flow_run_from_deployment(dep.id, parameters=parameters).id

    def wait(self, run_id: UUID, timeout: float) -> FlowRun:
        def final() -> FlowRun | None:
            with self.client() as client:
                run = client.read_flow_run(run_id)
            return run if run.state is not None and run.state.is_final() else None

        try:
            return wait_for(final, timeout, f"flow run {run_id}", interval=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- serve log ---\n{tail(self.log)}") from None

    def task_runs(self, run_id: UUID, count: int) -> list[TaskRun]:
        """Task runs reach the API through events, a few seconds after the flow run ends: wait for all."""

        def recorded() -> list[TaskRun] | None:
            with self.client() as client:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            return runs if len(runs) >= count and all(r.state and r.state.is_final() for r in runs) else None

        return wait_for(recorded, 60, f"{count} final task runs of {run_id}")


@pytest.fixture(scope="module")
def served(
    prefect_server: str, tmp_path_factory: pytest.TempPathFactory, gpt2_tiktoken_file: Path
) -> Iterator[Served]:
    clone = make_clone(tmp_path_factory.mktemp("deploy") / "gptlab")
    set_params(clone, TINY)
    env = clean_env(
        clone,
        PREFECT_API_URL=prefect_server,
        PREFECT_RUNNER_POLL_FREQUENCY="1",  # default 10 s between polls for triggered runs
        GPTLAB_TIKTOKEN_FILE=str(gpt2_tiktoken_file),  # offline tokenizer (the autouse fixture is per test)
        GPTLAB_CACHE=str(tmp_path_factory.getbasetemp() / "gptlab-cache"),
    )
    env.pop("GPTLAB_PIPELINE_RUN_ID", None)  # each flow run then groups its MLflow runs under its own id
    # --limit 2: this process would run two at once, so only the deployment's concurrency limit keeps them apart.
    cmd = [sys.executable, "-m", "pipelines.deploy", "serve", "--name", SERVED, "--limit", "2"]
    cmd += [arg for item in FAST for arg in ("--set-param", item)]
    log = clone.parent / "serve.log"
    with background(cmd, clone, env, log) as proc:
        state = Served(prefect_server, clone, env, log)

        def registered() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited ({proc.returncode}):\n{tail(log)}")
            return "serving;" in log.read_text()

        wait_for(registered, 120, "the served deployment")
        yield state


def test_served_deployment_is_registered_with_schedule_parameters_and_limit(served: Served) -> None:
    assert f"prefect deployment run 'gptlab-pipeline/{SERVED}'" in served.log.read_text()
    with served.client() as client:
        dep = client.read_deployment_by_name(f"gptlab-pipeline/{SERVED}")
        ((schedule,),) = [[s.schedule for s in dep.schedules if s.active]]
        assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "UTC")
        assert dep.parameters == {
            "root": str(served.clone.resolve()),
            "target": None,
            "force": False,
            "profile": None,
            "set_params": FAST,
            "push": None,
        }
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
        assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
        assert dep.entrypoint == deploy.ENTRYPOINT and not dep.paused
        # The schedule is live: the server's scheduler has already queued upcoming runs at 03:00 UTC.
        by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        upcoming = wait_for(
            lambda: [r for r in client.read_flow_runs(deployment_filter=by_deployment) if r.auto_scheduled],
            30,
            "scheduled runs",
        )
        assert {(r.expected_start_time.hour, r.expected_start_time.minute) for r in upcoming} == {(3, 0)}


def test_triggered_run_completes_its_stages_and_logs_them_to_mlflow(served: Served) -> None:
    from mlflow import MlflowClient

    run_id = served.trigger(target="tokenize")
    run = served.wait(run_id, timeout=420)
    assert run.state.is_completed(), f"{run.state}\n{tail(served.log)}"
    tasks = served.task_runs(run_id, len(STAGES))
    assert sorted(t.name for t in tasks) == sorted(STAGES)
    assert all(t.state.is_completed() for t in tasks)

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{served.clone / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("gptlab")
    stage_runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{run_id}' and tags.`gptlab.role` = 'stage'",
    )
    assert sorted(r.data.tags["gptlab.stage"] for r in stage_runs) == sorted(STAGES)
    assert {r.info.status for r in stage_runs} == {"FINISHED"}


def test_overlapping_runs_queue_instead_of_running_together(served: Served) -> None:
    first, second = served.trigger(target="download"), served.trigger(target="download")
    runs = sorted((served.wait(i, timeout=120) for i in (first, second)), key=lambda r: r.start_time)
    assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"]
    assert runs[0].end_time <= runs[1].start_time  # never both running
    with served.client() as client:
        history = [s.name for r in runs for s in client.read_flow_run_states(r.id)]
    # The serve process had room for both (--limit 2): the deployment's limit is what held one back.
    assert "AwaitingConcurrencySlot" in history


def test_run_overlapping_a_manual_dvc_repro_fails_with_dvcs_lock_error(served: Served) -> None:
    from dvc.repo import Repo

    # What a `dvc repro` in the same checkout does: hold the repo lock while the scheduled run starts.
    with Repo(str(served.clone)) as repo, repo.lock:
        run_id = served.trigger(target="download")
        run = served.wait(run_id, timeout=180)
    assert run.state.is_failed()
    assert re.search(
        r"RuntimeError: stage download failed \(dvc exit \d+\): ERROR: Unable to acquire lock\.",
        str(run.state.message),
    ), run.state.message
    (task,) = served.task_runs(run_id, 1)
    assert task.name == "download" and task.state.is_failed()
    assert "Unable to acquire lock" in str(task.state.message)
    assert task.run_count == 3  # the download task retried twice before giving up


def test_register_for_a_process_pool_matches_prefect_yaml(served: Served) -> None:
    def cli(*args: str, cwd: Path = served.clone, timeout: int = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(args), cwd=cwd, env=served.env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def read(name: str) -> dict[str, Any]:
        with served.client() as client:
            dep = client.read_deployment_by_name(f"gptlab-pipeline/{name}")
        return {
            "schedules": [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules],
            "limit": dep.global_concurrency_limit.limit if dep.global_concurrency_limit else None,
            "strategy": dep.concurrency_options.collision_strategy if dep.concurrency_options else None,
            **dep.model_dump(
                include={
                    "id",
                    "entrypoint",
                    "parameters",
                    "pull_steps",
                    "work_pool_name",
                    "tags",
                    "description",
                    "paused",
                }
            ),
        }

    missing = subprocess.run(
        [sys.executable, "-m", "pipelines.deploy", "register", "--pool", "missing"],
        cwd=served.clone,
        env=served.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert (
        "deploy: error: no work pool 'missing'; create it: prefect work-pool create missing" in missing.stderr
    )

    cli(str(BIN / "prefect"), "work-pool", "create", deploy.DEFAULT_POOL, "--type", "process")
    cli(str(BIN / "prefect"), "--no-prompt", "deploy", "-n", deploy.DEFAULT_NAME)
    from_yaml = read(deploy.DEFAULT_NAME)
    cli(sys.executable, "-m", "pipelines.deploy", "register")
    from_code = read(deploy.DEFAULT_NAME)
    assert from_code["id"] == from_yaml["id"]  # the same deployment, updated in place
    assert from_code["parameters"] == {**from_yaml["parameters"], "root": str(served.clone.resolve())}
    assert {**from_code, "parameters": None} == {**from_yaml, "parameters": None}
    assert from_code["schedules"] == [("0 3 * * *", "UTC")] and from_code["limit"] == 1
    assert from_code["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(served.clone.resolve())}}
    ]

    # Workers of a process pool running it: tests/test_stack.py (two workers, queued runs, a worker killed).
