"""``./run.sh pipeline --stack``: the pipeline as a run of its deployment on the team stack's work pool.

The deployment is ``prefect.yaml``'s, registered from this checkout for the stack's pool (``stack.yaml``) with
``push: stack``, its nightly schedule included: a run started here, one started from the UI and the 03:00 one
are the same deployment's runs, and its concurrency limit queues them behind each other instead of letting two
interleave in one workspace. Any worker polling the pool takes the run; the stages log to the stack's MLflow
server, and the outputs are pushed to its DVC remote once every stage succeeded. This command follows the run
through Prefect's API — the stages' progress lines as the worker reports them, then the outcome — and Ctrl-C
stops following, not the run.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path
from typing import IO
from uuid import UUID

from pipelines.stack import reachable
from pipelines.stack_config import ROOT, StackConfig, StackError, client_env, load_secrets

REMOTE = "stack"
"""The DVC remote ``./run.sh stack up`` configures (:func:`pipelines.stack.configure_dvc`)."""
POLL_SECONDS = 2.0
API_PATIENCE_SECONDS = 300.0
"""How long following a run survives a Prefect server that does not answer (a restart, its database away)."""


def connect(config: Path = ROOT / "stack.yaml") -> StackConfig:
    """The stack's client settings in this process's environment (inherited by everything it starts); a
    StackError naming what is missing or not answering."""
    cfg = StackConfig.load(config)
    if not (cfg.state_dir / "secrets.json").exists():
        raise StackError(
            f"no stack credentials in {cfg.state_dir}: start the stack first (./run.sh stack up)"
        )
    creds = load_secrets(cfg)
    down = [f"{name} ({url})" for name, url, ok in reachable(cfg) if not ok]
    if down:
        raise StackError(f"not answering: {', '.join(down)}; start the stack: ./run.sh stack up")
    os.environ.update(client_env(cfg, creds))
    os.environ["PREFECT_HOME"] = str(cfg.state_dir / "prefect-client")
    return cfg


def register(cfg: StackConfig) -> UUID:
    """``prefect.yaml``'s deployment for the stack's pool, pushing to the stack's remote (idempotent)."""
    from pipelines import deploy

    args = deploy.parse_args(["register", "--pool", cfg.work_pool, "--push", REMOTE])
    try:
        deploy.check_pool(cfg.work_pool)
    except ValueError as exc:
        raise StackError(str(exc)) from None
    with contextlib.redirect_stdout(io.StringIO()):  # Prefect's table of deployments: not this command's news
        return deploy.register_deployment(args)


def trigger(deployment_id: UUID, run_id: str, parameters: dict) -> UUID:
    """A flow run of the deployment, named and tagged by this execution's id (which its MLflow runs carry)."""
    from prefect.deployments import run_deployment

    from stages import run_context

    flow_run = run_deployment(
        deployment_id,
        parameters=parameters,
        timeout=0,
        as_subflow=False,
        flow_run_name=run_id,
        job_variables={"env": {run_context.RUN_ID: run_id}},
    )
    return flow_run.id


def follow(flow_run_id: UUID, console: IO[str]) -> object:
    """Show the run's queueing and progress lines until it ends; its final state."""
    import httpx
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort
    from prefect.exceptions import PrefectHTTPStatusError

    from pipelines.flow import PROGRESS_LOGGER

    seen: set[UUID] = set()
    after = None
    said = None
    quiet_polls = 0
    failing_since = None
    with get_client(sync_client=True) as client:
        while True:
            try:
                run = client.read_flow_run(flow_run_id)
                logs = client.read_logs(
                    LogFilter(
                        flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                        timestamp=LogFilterTimestamp(after_=after) if after else None,
                    ),
                    limit=200,
                    sort=LogSort.TIMESTAMP_ASC,
                )
            except (PrefectHTTPStatusError, httpx.TransportError) as exc:
                # The server (or its database) restarting: the run goes on, keep asking for a while.
                reason = str(exc).splitlines()[0]
                if failing_since is None:
                    failing_since = time.monotonic()
                    console.write(f"  the Prefect API is not answering ({reason[:120]}); retrying\n")
                elif time.monotonic() - failing_since > API_PATIENCE_SECONDS:
                    raise StackError(
                        f"the Prefect server at {os.environ['PREFECT_API_URL']} stopped answering for "
                        f"{API_PATIENCE_SECONDS:.0f} s ({reason[:200]}); the run may still be going"
                    ) from None
                time.sleep(POLL_SECONDS)
                continue
            failing_since = None
            state = run.state
            if state is not None and state.name != said:
                said = state.name
                if state.is_scheduled() or state.is_pending():
                    why = (
                        "behind the deployment's active run"
                        if state.name == "AwaitingConcurrencySlot"
                        else ""
                    )
                    console.write(f"  {state.name.lower()}: waiting for a worker {why}".rstrip() + "\n")
                elif state.is_running():
                    host = (run.infrastructure_pid or "?").split(":")[0]
                    console.write(f"  running on a worker of pool {run.work_pool_name!r} ({host})\n")
            new = [log for log in logs if log.id not in seen]
            for log in new:
                seen.add(log.id)
                after = log.timestamp
                if log.name.endswith(f".{PROGRESS_LOGGER}"):
                    console.write(log.message + "\n")
            console.flush()
            # Logs reach the server in batches after the state does: drain them before returning.
            final = state is not None and state.is_final()
            quiet_polls = quiet_polls + 1 if final and not new else 0
            if quiet_polls >= 2:
                return state
            time.sleep(POLL_SECONDS)


def outcome(state) -> str | None:
    """None when the run completed, else one line saying how it ended and why."""
    if state.is_completed():
        return None
    message = (state.message or "").removeprefix("Flow run encountered an exception: ")
    message = message.removeprefix("RuntimeError: ").strip().splitlines()
    line = f"the run ended {state.name}" + (f": {message[0]}" if message else "")
    if state.is_crashed():  # its worker or machine died, or it was stopped: nothing of it is lost
        line += " (its worker died or it was stopped; run again: stages resume from their checkpoints)"
    return line


def run(
    target: str | None,
    force: bool,
    profile: str | None,
    set_params: list[str],
    run_id: str,
    console: IO[str] = sys.stdout,
) -> int:
    try:
        cfg = connect()
        from pipelines.graph import dvc_stages

        dvc_stages(ROOT, target)  # an unknown target fails here, in one line, not on the worker
        deployment_id = register(cfg)
        parameters = {"target": target, "force": force, "profile": profile, "set_params": set_params or None}
        flow_run_id = trigger(deployment_id, run_id, parameters)
    except (StackError, ValueError) as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2
    ui = f"{cfg.prefect_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"
    console.write(f"pipeline {run_id} on the stack (work pool {cfg.work_pool!r}): {ui}\n")
    try:
        state = follow(flow_run_id, console)
    except KeyboardInterrupt:
        console.write(f"\nstopped following; the run goes on on the stack: {ui}\n")
        return 130
    except StackError as exc:
        print(f"pipeline: error: {exc}\n  the run: {ui}", file=sys.stderr)
        return 2
    problem = outcome(state)
    if problem:
        console.write(f"pipeline: error: {problem}\n  logs: {ui} (or ./run.sh stack logs worker-1)\n")
        return 2
    console.write(
        "\n".join(
            [
                f"\npipeline {run_id} completed on the stack",
                f"outputs: this checkout, and DVC remote {REMOTE!r} ({cfg.dvc_remote}): dvc pull -r {REMOTE}",
                f"runs:    {cfg.mlflow_url} (experiment gptlab)",
            ]
        )
        + "\n"
    )
    return 0
