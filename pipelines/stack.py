"""The team stack: the pipeline's shared services on one machine, as MLflow's and Prefect's deployment guides
describe them — PostgreSQL (one database for MLflow, one for Prefect), SeaweedFS's S3 gateway (MLflow's
artifacts and DVC's remote), ``mlflow server`` (PostgreSQL backend, artifacts proxied to S3, basic auth),
``prefect server`` (PostgreSQL, API auth) and process workers polling one work pool (docs/stack.md).

``./run.sh stack up | down | status | logs [SERVICE]``. Configuration is by URL (``stack.yaml``); every service
listens on ``host`` (127.0.0.1 unless told otherwise) and requires credentials, generated at the first ``up``
into ``<state_dir>/secrets.json`` (mode 0600) and never printed. Data lives under ``state_dir`` and survives
``down``/``up``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipelines.stack_config import ROOT, SERVICES, StackConfig, StackError, load_secrets
from pipelines.stack_services import (
    http_ok,
    make_buckets,
    mlflow_up,
    pid_of,
    postgres_down,
    postgres_running,
    postgres_up,
    prefect_up,
    s3_up,
    stop,
    wait_healthy,
    workers_online,
    workers_up,
    zombie_automation,
)

# --- the commands ------------------------------------------------------------------------------------------


def reachable(cfg: StackConfig) -> list[tuple[str, str, bool]]:
    """What a client of the stack talks to (tracking server, Prefect API, object store): name, URL, answering.
    Their health endpoints need no credentials."""
    return [
        ("mlflow", cfg.mlflow_url, http_ok(f"{cfg.mlflow_url}/health")),
        ("prefect", cfg.prefect_url, http_ok(f"{cfg.prefect_url}/health")),
        ("s3", cfg.s3_url, http_ok(f"{cfg.s3_url}/healthz")),
    ]


def health(cfg: StackConfig) -> dict[str, tuple[bool, str]]:
    """Each service: (healthy, URL)."""
    answers = {name: (ok, url) for name, url, ok in reachable(cfg)}
    workers = [pid_of(cfg, f"worker-{i}") is not None for i in range(1, cfg.workers + 1)]
    return {
        "postgres": (postgres_running(cfg), cfg.postgres_url),
        "s3": answers["s3"],
        "mlflow": answers["mlflow"],
        "prefect": answers["prefect"],
        "workers": (
            (bool(workers) and all(workers)) if cfg.starts("workers") else True,
            f"{sum(workers)}/{cfg.workers} polling {cfg.work_pool!r}"
            if cfg.starts("workers")
            else "none started here",
        ),
    }


def configure_dvc(cfg: StackConfig, creds: dict[str, str], repo: Path = ROOT) -> None:
    """The DVC remote ``stack`` on the object store, credentials in ``.dvc/config.local`` (not in git)."""
    from dvc.config import Config, ConfigError

    local_file = repo / ".dvc" / "config.local"
    if not local_file.exists():  # private before the keys go in
        os.close(os.open(local_file, os.O_WRONLY | os.O_CREAT, 0o600))
    try:
        with Config(dvc_dir=str(repo / ".dvc")).edit("local") as local:
            local["remote"]["stack"] = {
                "url": cfg.dvc_remote,
                "endpointurl": cfg.s3_url,
                "access_key_id": creds["s3_access_key"],
                "secret_access_key": creds["s3_secret_key"],
            }
    except ConfigError as exc:
        raise StackError(f"{repo / '.dvc'}: configuring the DVC remote failed: {exc}") from None
    local_file.chmod(0o600)


def up(cfg: StackConfig, repo: Path = ROOT) -> float | None:
    """Start whatever is not running; the seconds it took, None when all was running. StackError on a failure."""
    t0 = time.monotonic()
    creds = load_secrets(cfg)
    running = [name for name, (ok, _) in health(cfg).items() if ok]
    if len(running) == len(SERVICES):
        return None
    cfg.logs.mkdir(parents=True, exist_ok=True)
    missing = [name for name in SERVICES if name not in running and cfg.starts(name)]
    if "s3" in missing and pid_of(cfg, "s3") is None:
        s3_up(cfg, creds)  # slowest to start: first, beside PostgreSQL
    if "postgres" in missing:
        postgres_up(cfg, creds)
    elif not cfg.starts("postgres"):
        wait_healthy(
            cfg,
            "postgres",
            f"PostgreSQL at {cfg.postgres_url} (not started here)",
            lambda: postgres_running(cfg),
            10,
        )
    if "mlflow" in missing and pid_of(cfg, "mlflow") is None:
        mlflow_up(cfg, creds)
    if "prefect" in missing and pid_of(cfg, "prefect") is None:
        prefect_up(cfg, creds)
    wait_healthy(cfg, "s3", "SeaweedFS (S3)", lambda: http_ok(f"{cfg.s3_url}/healthz"), 90)
    make_buckets(cfg, creds)
    wait_healthy(cfg, "prefect", "the Prefect server", lambda: http_ok(f"{cfg.prefect_url}/health"), 180)
    zombie_automation(cfg, creds)
    workers_up(cfg, creds)
    wait_healthy(cfg, "mlflow", "the MLflow server", lambda: http_ok(f"{cfg.mlflow_url}/health"), 180)
    configure_dvc(cfg, creds, repo)
    if cfg.starts("workers"):  # up means polling: a worker is ONLINE once its first poll reached the server
        wait_healthy(
            cfg, "worker-1", f"the workers of pool {cfg.work_pool!r}",
            lambda: workers_online(cfg, creds) == cfg.workers, 60,
        )  # fmt: skip
    return time.monotonic() - t0


def down(cfg: StackConfig) -> None:
    """Stop everything ``up`` started: the workers and servers together, then PostgreSQL, which they use."""
    stop(cfg, *(f"worker-{i}" for i in range(1, cfg.workers + 1)), "prefect", "mlflow", "s3")
    if cfg.starts("postgres"):
        postgres_down(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status", "logs"))
    parser.add_argument("service", nargs="?", choices=(*SERVICES[:-1], *(f"worker-{i}" for i in range(1, 9))))
    parser.add_argument("--config", type=Path, default=ROOT / "stack.yaml")
    parser.add_argument("--host", help="listen on this address instead of stack.yaml's host (auth stays on)")
    args = parser.parse_args(argv)
    try:
        cfg = StackConfig.load(args.config, host=args.host)
        if args.command == "up":
            print(f"stack: starting (state in {cfg.state_dir}) ...", flush=True)
            took = up(cfg)
            if took is None:
                print(f"stack: already running (state in {cfg.state_dir})", flush=True)
            else:
                print(f"stack: up in {took:.0f} s", flush=True)
            _print_status(cfg)
        elif args.command == "down":
            down(cfg)
            print("stack: stopped", flush=True)
        elif args.command == "status":
            return 0 if _print_status(cfg) else 1
        else:
            name = args.service or "prefect"
            log = cfg.logs / f"{name}.log"
            if not log.exists():
                raise StackError(f"{log}: no log yet (./run.sh stack up)")
            sys.stdout.write("".join(log.read_text(errors="replace").splitlines(keepends=True)[-50:]))
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_status(cfg: StackConfig) -> bool:
    if not (cfg.state_dir / "secrets.json").exists():
        print(f"stack: never started here ({cfg.state_dir} holds nothing): ./run.sh stack up")
        return False
    states = health(cfg)
    for name, (ok, url) in states.items():
        print(f"  {name:<9} {'up' if ok else 'down':<5} {url}")
    return all(ok for ok, _ in states.values())


if __name__ == "__main__":
    sys.exit(main())
