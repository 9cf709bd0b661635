"""Scheduled deployment of the ``gptlab-pipeline`` flow (nightly ``dvc repro``, stage by stage, through Prefect).

Single machine (the default: no Docker, no Kubernetes). In every shell, from the repo root::

    source .venv/bin/activate
    export PREFECT_HOME=$PWD/.prefect PREFECT_API_URL=http://127.0.0.1:4200/api

    prefect server start                    # shell 1: API + UI on http://127.0.0.1:4200 (keep it running)
    python -m pipelines.deploy serve        # shell 2: registers gptlab-pipeline/gptlab-nightly (03:00 UTC daily)
                                            #          and runs its flow runs in this process, one at a time
    prefect deployment run 'gptlab-pipeline/gptlab-nightly'   # shell 3: a run now (or "Run" on its UI page)

Options (same for ``serve`` and ``register``): ``--name gptlab-nightly --cron "0 3 * * *" --timezone UTC
--target STAGE --profile sample|book --set-param section.key=value`` (repeatable, as ``dvc exp run -S``),
``--push REMOTE`` (``dvc push`` the outputs there after each run), and ``--api-url`` (default: ``PREFECT_API_URL``, else http://127.0.0.1:4200/api). ``serve --limit 1`` caps the flow
runs this process executes at once. Stopping ``serve`` (Ctrl-C) pauses the schedule, so no runs pile up as
"Late" while nothing executes them; starting it again resumes it.

With a work pool and a worker instead of ``serve`` (same deployment, the flow code is read from this checkout)::

    prefect work-pool create gptlab --type process
    python -m pipelines.deploy register --pool gptlab      # serve's options (except --limit)
    prefect worker start --pool gptlab --limit 1           # executes the runs; keep it running
    prefect deployment run 'gptlab-pipeline/gptlab-nightly'

The deployment is defined once, in ``prefect.yaml``: its name, entrypoint, schedule, parameters, concurrency
limit, tags and work pool are read from there, so ``prefect deploy -n gptlab-nightly`` (repo root) and this
module create the same deployment; options given here override the file's values.

Docker or Kubernetes: nothing here changes but the pool and where the code lives. Build an image yourself
(this module builds none) that copies the repo to ``/opt/prefect`` (where ``prefect deploy`` expects a job
image's code unless told otherwise) and runs ``pip install -e ".[pipeline]"`` there,
create ``prefect work-pool create gptlab-docker --type docker`` (``pip install prefect-docker``) or
``--type kubernetes`` (``prefect-kubernetes``), and deploy from ``prefect.yaml`` with that pool and image::

    prefect deploy -n gptlab-nightly --pool gptlab-docker --job-variable image=gptlab:latest

(``root: "."`` in ``prefect.yaml`` resolves in the image's working directory; ``register`` instead pins this
checkout's absolute path, which only a process worker on this machine can use.) Then ``prefect worker start
--pool gptlab-docker``. The pipeline's stores (``mlflow.db``, DVC cache) must then live on a volume or behind
``MLFLOW_TRACKING_URI`` / a DVC remote, or each container starts from scratch.

Seeing runs: http://127.0.0.1:4200 -> Deployments -> gptlab-nightly (schedule, upcoming and past runs), each flow
run with one task run per DVC stage, its logs (the stage's own output) and the metrics artifacts. The MLflow runs
of an execution carry its id as tag ``prefect.flow_run_id`` (``mlflow ui --backend-store-uri sqlite:///mlflow.db``).

Failures: a stage's task fails with the stage's one-line error (``stage X failed (dvc exit N): X: error: ...``),
the flow run goes Failed and its MLflow parent run is closed as FAILED with the summary of what did run. The
download task retries twice, 5 s apart (the only stage that talks to the network). Runs of this deployment never
overlap: ``concurrency_limit=1`` (collision strategy ENQUEUE) queues a run triggered while another is active
until that one ends (``serve --limit 1`` / ``worker --limit 1`` also keep each executor to one). A manual
``dvc repro`` or ``./run.sh pipeline`` in the same checkout at the same time is not covered by that: the run's
next stage then fails with DVC's ``ERROR: Unable to acquire lock. ...`` as its task error; trigger it again.
To be told about failures, attach an automation: UI -> Automations -> "+" -> trigger "Flow run state", flow
``gptlab-pipeline``, states Failed and Crashed -> action "Send a notification" (a Slack webhook / email block).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.deployments.runner import RunnerDeployment

ROOT = Path(__file__).resolve().parents[1]
FLOW_NAME = "gptlab-pipeline"
DEFAULT_API_URL = "http://127.0.0.1:4200/api"


def deployment_spec(root: Path = ROOT) -> dict[str, Any]:
    """The deployment as ``prefect.yaml`` defines it (the only definition)."""
    (spec,) = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]
    return spec


SPEC = deployment_spec()
ENTRYPOINT: str = SPEC["entrypoint"]
DEFAULT_NAME: str = SPEC["name"]
DEFAULT_CRON: str = SPEC["schedules"][0]["cron"]
DEFAULT_TIMEZONE: str = SPEC["schedules"][0]["timezone"]
DEFAULT_POOL: str = SPEC["work_pool"]["name"]
CONCURRENCY_LIMIT: int = SPEC["concurrency_limit"]["limit"]
"""One active run per deployment: two ``dvc repro`` in one checkout would fight over DVC's lock and outputs."""
COLLISION_STRATEGY: str = SPEC["concurrency_limit"]["collision_strategy"]
TAGS: list[str] = SPEC["tags"]
DESCRIPTION: str = SPEC["description"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipelines.deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="register the deployment and execute its runs in this process")
    register = sub.add_parser("register", help="register the deployment for a work pool (a worker runs it)")
    register.add_argument(
        "--pool",
        default=DEFAULT_POOL,
        help=f"a process work pool (default {DEFAULT_POOL}, as in prefect.yaml)",
    )
    serve.add_argument(
        "--limit", type=int, default=1, help="most flow runs this process executes at once (default 1)"
    )
    for p in (serve, register):
        p.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default {DEFAULT_NAME})")
        p.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule (default {DEFAULT_CRON!r})")
        p.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="IANA timezone of the cron schedule")
        p.add_argument("--target", default=None, help="run only up to this DVC stage")
        p.add_argument("--profile", default=None, help="switch params.yaml to profiles/<profile>.yaml first")
        p.add_argument(
            "--set-param",
            action="append",
            default=None,
            metavar="SECTION.KEY=VALUE",
            help="params.yaml override applied at each run (repeatable)",
        )
        p.add_argument(
            "--push",
            default=None,
            metavar="REMOTE",
            help="dvc push the outputs to this DVC remote after each run",
        )
        p.add_argument("--api-url", default=None, help="Prefect API (default: PREFECT_API_URL, else 4200)")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace, root: Path = ROOT) -> None:
    """Reject what would only fail at 03:00: an unknown profile, stage or malformed override."""
    from pipelines.profile import available

    if args.profile is not None and args.profile not in available(root):
        raise ValueError(f"unknown profile {args.profile!r}; available: {', '.join(available(root))}")
    for item in args.set_param or []:
        key, sep, _ = item.partition("=")
        if not sep or not key or "." not in key:
            raise ValueError(f"--set-param {item!r}: expected section.key=value")
    if args.target is not None:
        from dvc.exceptions import DvcException

        from pipelines.graph import dvc_stages

        # From the root: DVC names stages relative to the cwd, and the flow runs from the root.
        try:
            with contextlib.chdir(root):
                dvc_stages(root, args.target)  # ValueError naming the stages dvc.yaml has
        except DvcException as exc:  # no DVC repo, a broken dvc.yaml/dvc.lock: one line too
            raise ValueError(f"dvc: {exc}") from exc
    if getattr(args, "limit", 1) < 1:
        raise ValueError("--limit must be at least 1")


def flow_parameters(args: argparse.Namespace, root: Path = ROOT) -> dict[str, Any]:
    """The flow's parameters, all spelled out so the deployment's page shows exactly what a run does."""
    # prefect.yaml's root: "." is the pull step's working directory (portable to images); served and
    # process-pool deployments pin this checkout's absolute path instead.
    defaults = {**SPEC["parameters"], "root": str(root)}
    return {
        **defaults,
        "target": args.target if args.target is not None else defaults["target"],
        "profile": args.profile if args.profile is not None else defaults["profile"],
        "set_params": list(args.set_param) if args.set_param else defaults["set_params"],
        "push": args.push if args.push is not None else defaults["push"],
    }


def deployment_options(args: argparse.Namespace, root: Path = ROOT) -> dict[str, Any]:
    """Options shared by ``to_deployment`` (serve) and ``deploy`` (work pool): one definition, two executors."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    return {
        # Cron() rather than cron=...: only a Schedule object carries a timezone.
        "schedules": [Cron(args.cron, timezone=args.timezone)],
        "parameters": flow_parameters(args, root),
        # ENQUEUE (Prefect's default, spelled out): an overlapping run waits for the active one, never dropped.
        "concurrency_limit": ConcurrencyLimitConfig(
            limit=CONCURRENCY_LIMIT, collision_strategy=ConcurrencyLimitStrategy(COLLISION_STRATEGY)
        ),
        "description": DESCRIPTION,
        "tags": TAGS,
    }


def build_deployment(args: argparse.Namespace, root: Path = ROOT) -> RunnerDeployment:
    """The served deployment, built offline (nothing is sent to the API until it is served)."""
    from pipelines.flow import pipeline

    # The entrypoint is recorded relative to the cwd (pipelines/flow.py:pipeline): make that the repo root.
    with contextlib.chdir(ROOT):
        return pipeline.to_deployment(args.name, **deployment_options(args, root))


def resolve_api_url(explicit: str | None) -> str:
    """``--api-url``, else the configured ``PREFECT_API_URL`` (env or profile), else the local default server.

    Without any, Prefect would start a throw-away server for this process only: the deployment would vanish with
    it and ``prefect deployment run`` in another shell could never reach it.
    """
    from prefect.settings import PREFECT_API_URL

    url = explicit or PREFECT_API_URL.value() or DEFAULT_API_URL
    return url.rstrip("/")


def check_server(api_url: str, timeout: float = 5.0) -> None:
    """Fail in one line when no server answers, instead of Prefect's retries and traceback."""
    from stages.tracking import health_problem

    reason = health_problem(api_url, timeout)
    if reason is not None:
        raise ConnectionError(
            f"no Prefect server at {api_url} ({reason}); start one with `prefect server start` "
            "or point --api-url / PREFECT_API_URL at yours"
        ) from None


def ui_url(api_url: str) -> str:
    return api_url.removesuffix("/api")


def next_steps(api_url: str, name: str, deployment_id: object, executor: str) -> str:
    full = f"{FLOW_NAME}/{name}"
    return "\n".join(
        [
            f"deployment {full!r} registered at {api_url} (id {deployment_id})",
            f"  runs are executed by: {executor}",
            f"  trigger a run now:    PREFECT_API_URL={api_url} prefect deployment run '{full}'",
            f"  see it in the UI:     {ui_url(api_url)}/deployments/deployment/{deployment_id}",
        ]
    )


def serve(args: argparse.Namespace, api_url: str) -> int:
    import asyncio

    from prefect.runner import Runner

    deployment = build_deployment(args)
    # Runner rather than prefect.serve(): the same loop, but the deployment id is known before it blocks, so the
    # message below can say where it registered. pause_on_shutdown: no 03:00 runs pile up while nobody serves.
    runner = Runner(name=f"gptlab-{args.name}", limit=args.limit, pause_on_shutdown=True)
    deployment_id = runner.add_deployment(deployment)
    print(
        next_steps(api_url, args.name, deployment_id, f"this process (pid {os.getpid()}, limit {args.limit})")
    )
    print("serving; Ctrl-C stops it (and pauses the schedule)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # SIGTERM is handled by the runner itself, gracefully
        asyncio.run(runner.start())
    print("stopped; the schedule stays paused until the next `serve`")
    return 0


def check_pool(name: str) -> None:
    """``register`` pins this checkout's path, which only a process worker on this machine can use."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            raise ValueError(
                f"no work pool {name!r}; create it: prefect work-pool create {name} --type process"
            ) from None
    if pool.type != "process":
        raise ValueError(
            f"work pool {name!r} is of type {pool.type!r}; `register` deploys this checkout for a process pool. "
            "For docker/kubernetes use `prefect deploy` with prefect.yaml (see `pydoc pipelines.deploy`)"
        )


def register_deployment(args: argparse.Namespace) -> UUID:
    """The deployment for the process pool ``args.pool``, created or updated; its id."""
    from prefect import flow

    # from_source: the worker loads the flow from this checkout (a process pool on this machine).
    source_flow = flow.from_source(source=str(ROOT), entrypoint=ENTRYPOINT)
    return source_flow.deploy(
        args.name,
        work_pool_name=args.pool,
        build=False,  # no image: a process worker runs in this checkout's venv
        push=False,
        print_next_steps=False,  # ours name the worker command
        ignore_warnings=True,  # Prefect's "try .serve() instead" hint: serve is the other subcommand
        **deployment_options(args),
    )


def register(args: argparse.Namespace, api_url: str) -> int:
    deployment_id = register_deployment(args)
    print(next_steps(api_url, args.name, deployment_id, f"a worker: prefect worker start --pool {args.pool}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Same conventions as pipelines.run: the repo root as cwd (the flow's entrypoint is relative to it) and the
    # repo's own Prefect home; both before Prefect is imported, as it reads its settings at import.
    os.chdir(ROOT)
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        validate(args)
        api_url = resolve_api_url(args.api_url)
        check_server(api_url)
    except (ValueError, ConnectionError) as exc:
        print(f"deploy: error: {exc}", file=sys.stderr)
        return 2
    # The env var too: flow-run subprocesses and `dvc repro` children must talk to the same server.
    os.environ["PREFECT_API_URL"] = api_url
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        if args.command == "serve":
            return serve(args, api_url)
        try:
            check_pool(args.pool)
        except ValueError as exc:
            print(f"deploy: error: {exc}", file=sys.stderr)
            return 2
        return register(args, api_url)


if __name__ == "__main__":
    sys.exit(main())
