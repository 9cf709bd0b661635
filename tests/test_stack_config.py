"""stack.yaml (pipelines/stack_config.py) without starting anything: the repository's file loads, its pool
is prefect.yaml's, ``start:`` names services, clients reach each service at its URL's host, and the stack's
client environment makes MLflow and Prefect ride out a database restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from clones import REPO

from pipelines.deploy import DEFAULT_POOL
from pipelines.stack import health
from pipelines.stack_config import SERVICES, StackConfig, StackError, client_env


def write(tmp_path: Path, drop: str | None = None, **changes) -> Path:
    config = yaml.safe_load((REPO / "stack.yaml").read_text())
    config.update(changes)
    config.pop(drop, None)
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_repository_stack_starts_everything_here_for_prefect_yamls_pool() -> None:
    cfg = StackConfig.load(REPO / "stack.yaml")
    assert cfg.start == SERVICES and cfg.work_pool == DEFAULT_POOL
    assert cfg.state_dir == REPO / ".stack" and cfg.address(cfg.mlflow_url) == "127.0.0.1"


def test_start_names_services(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"start: unknown service 'redis'; expected some of postgres, s3"):
        StackConfig.load(write(tmp_path, start=["workers", "redis"]))
    with pytest.raises(StackError, match=r"expected the keys .*start"):
        StackConfig.load(write(tmp_path, drop="start"))


def test_a_machine_that_only_runs_workers_reaches_the_others_by_url(tmp_path: Path) -> None:
    cfg = StackConfig.load(
        write(
            tmp_path,
            state_dir=str(tmp_path / "state"),
            start=["workers"],
            postgres_url="postgresql://10.9.8.7:5432",
            mlflow_url="http://10.9.8.7:15000",
        )
    )
    assert not cfg.starts("postgres") and cfg.starts("workers")
    assert cfg.address(cfg.postgres_url) == "10.9.8.7"  # not `host`, which is only where local servers listen
    creds = {"mlflow_user": "admin", "mlflow_password": "pw", "prefect_auth": "admin:x"}
    env = client_env(cfg, creds)
    assert env["MLFLOW_TRACKING_URI"] == "http://10.9.8.7:15000"
    assert (
        env["PREFECT_CLIENT_RETRY_EXTRA_CODES"] == "500" and int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) >= 5
    )


def test_status_of_a_stack_that_is_not_running(tmp_path: Path) -> None:
    closed = {  # port 9 (discard): nothing listens there
        f"{name}_url": f"{scheme}://127.0.0.1:9{path}"
        for name, scheme, path in (("postgres", "postgresql", ""), ("s3", "http", ""), ("mlflow", "http", ""),
                                   ("prefect", "http", "/api"))
    }  # fmt: skip
    cfg = StackConfig.load(write(tmp_path, state_dir=str(tmp_path / "state"), **closed))
    states = health(cfg)
    assert set(states) == set(SERVICES) and not any(ok for ok, _ in states.values())
