"""The team stack's configuration: ``stack.yaml`` (every service by URL, and which of them this machine runs) and
the credentials the first ``up`` generates (``<state_dir>/secrets.json``, mode 0600, never printed)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("postgres", "s3", "mlflow", "prefect", "workers")


class StackError(Exception):
    """A failure the user acts on; ``main`` prints it as one line."""


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """``stack.yaml``: the services by URL, and what this machine starts."""

    state_dir: Path
    host: str
    postgres_url: str
    s3_url: str
    mlflow_url: str
    prefect_url: str
    mlflow_artifacts: str
    dvc_remote: str
    work_pool: str
    workers: int
    start: tuple[str, ...]

    @classmethod
    def load(cls, path: Path, host: str | None = None) -> StackConfig:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise StackError(f"{path}: cannot read the stack configuration ({exc})") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != fields:
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise StackError(f"{path}: expected the keys {', '.join(sorted(fields))}; found {found}")
        state = Path(raw["state_dir"])
        raw["state_dir"] = state if state.is_absolute() else path.parent / state
        raw["workers"] = int(raw["workers"])
        start = raw["start"] if isinstance(raw["start"], list) else [raw["start"]]
        unknown = [name for name in start if name not in SERVICES]
        if unknown:
            raise StackError(
                f"{path}: start: unknown service {unknown[0]!r}; expected some of {', '.join(SERVICES)}"
            )
        raw["start"] = tuple(start)
        if host is not None:
            raw["host"] = host
        return cls(**raw)

    def starts(self, name: str) -> bool:
        """Whether this machine runs the service (the others are reached at their URLs)."""
        return name in self.start

    def address(self, url: str) -> str:
        """The host clients reach a service at: its URL's (the local servers listen on ``host``)."""
        return urlsplit(url).hostname or self.host

    def port(self, url: str) -> int:
        parts = urlsplit(url)
        if parts.port is None:
            raise StackError(f"stack.yaml: {url!r} needs an explicit port")
        return parts.port

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.state_dir / "pids"


# --- credentials -------------------------------------------------------------------------------------------


def load_secrets(cfg: StackConfig) -> dict[str, str]:
    """The stack's credentials, generated (mode 0600) on first use."""
    path = cfg.state_dir / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    token = lambda: secrets.token_urlsafe(24)  # noqa: E731 (URL-, SQL- and ini-safe)
    values = {
        "postgres_password": token(),
        "mlflow_db_password": token(),
        "prefect_db_password": token(),
        "s3_access_key": "gptlab" + secrets.token_hex(8),
        "s3_secret_key": token(),
        "mlflow_user": "admin",
        "mlflow_password": token(),
        "mlflow_flask_secret": token(),
        "prefect_auth": f"admin:{token()}",
    }
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f, indent=1)
    os.replace(path.with_suffix(".tmp"), path)
    return values


def client_env(cfg: StackConfig, creds: dict[str, str]) -> dict[str, str]:
    """What a client of the stack (the pipeline, a worker, a teammate's shell) sets: URLs and credentials."""
    return {
        "MLFLOW_TRACKING_URI": cfg.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": creds["mlflow_user"],
        "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"],
        "PREFECT_API_URL": cfg.prefect_url,
        "PREFECT_API_AUTH_STRING": creds["prefect_auth"],
        # A server whose database is briefly away answers 500 or 503: ride out a PostgreSQL restart of up to
        # about a minute instead of ending the run. Prefect retries 502/503 (5 tries, 2 to 32 s apart) and,
        # with this, 500; MLflow's client (which stages.tracking makes fail fast by default) 6 times, 1 to 32 s.
        "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
