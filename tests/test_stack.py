"""The team stack (pipelines/stack.py) for real on 127.0.0.1: PostgreSQL, SeaweedFS's S3 gateway, the MLflow and
Prefect servers and two workers come up from ``python -m pipelines.stack up`` in a clone, refuse requests
without credentials, take a tracked run (its artifact lands in the S3 bucket) and a DVC push that a fresh clone
pulls byte for byte, keep their data across ``down``/``up``, and leave no process behind."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from clones import git, make_clone

pytestmark = pytest.mark.slow

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(span: tuple[int, ...] = (0,)) -> int:
    """A port P with P + each offset in ``span`` free (SeaweedFS takes S3, master, volume, filer and gRPC +10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + max(span) > 65535:
            continue
        try:
            for offset in span:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port span")


def stack(clone: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.stack", *args],
        cwd=clone, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def request(url: str, *, data: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with _NO_PROXY.open(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def healthy(status: str) -> int:
    """Services the status table shows up."""
    return sum(line.split()[1:2] == ["up"] for line in status.splitlines() if line.startswith("  "))


def basic(user_pass: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


def processes_of(state: Path) -> list[str]:
    """Live processes of this stack: its state directory on their command line, in their environment or cwd."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                continue
        except OSError:
            continue
        if str(state) in cmd or str(state) in environ or cwd.startswith(str(state)):
            found.append(f"{pid}: {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_clone(tmp_path_factory.mktemp("stack"))
    # PostgreSQL's own user (the server refuses root) must reach its data: pytest's directories are private.
    state = Path(tempfile.mkdtemp(prefix="gptlab-stack-"))
    state.chmod(0o711)
    s3 = free_port((0, 1, 2, 3, 10000, 10001, 10002, 10003))
    config = yaml.safe_load((root / "stack.yaml").read_text())
    config.update(
        state_dir=str(state),
        postgres_url=f"postgresql://127.0.0.1:{free_port()}",
        s3_url=f"http://127.0.0.1:{s3}",
        mlflow_url=f"http://127.0.0.1:{free_port()}",
        prefect_url=f"http://127.0.0.1:{free_port()}/api",
    )
    (root / "stack.yaml").write_text(yaml.safe_dump(config))
    yield root
    stack(root, "down")
    shutil.rmtree(state, ignore_errors=True)


def test_the_stack_comes_up_guarded_shares_runs_and_outputs_and_goes_down(
    clone: Path, tmp_path: Path
) -> None:
    cfg = yaml.safe_load((clone / "stack.yaml").read_text())
    state = Path(cfg["state_dir"])
    first = stack(clone, "up")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stack: up in" in first.stdout and healthy(first.stdout) == 5
    again = stack(clone, "up")
    assert again.returncode == 0 and "already running" in again.stdout
    status = stack(clone, "status")
    assert status.returncode == 0 and all(
        f"{s} " in status.stdout for s in ("postgres", "s3", "mlflow", "prefect")
    )

    # Credentials: generated, private, never printed.
    creds = json.loads((state / "secrets.json").read_text())
    assert (state / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert (clone / ".dvc" / "config.local").stat().st_mode & 0o777 == 0o600
    printed = first.stdout + first.stderr + again.stdout + status.stdout
    assert not any(v in printed for v in creds.values() if len(v) > 8)

    # Nothing answers without credentials.
    mlflow, prefect, s3 = cfg["mlflow_url"], cfg["prefect_url"], cfg["s3_url"]
    assert request(f"{mlflow}/api/2.0/mlflow/experiments/search", data={"max_results": 1})[0] == 401
    assert request(f"{prefect}/flows/filter", data={})[0] == 401
    assert request(f"{prefect}/flows/filter", data={}, headers=basic("admin:wrong"))[0] == 401
    assert request(f"{s3}/mlflow-artifacts")[0] == 403

    # A tracked run through the tracking server; its artifact is proxied into the S3 bucket.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))},
        "MLFLOW_TRACKING_URI": mlflow,
        "MLFLOW_TRACKING_USERNAME": creds["mlflow_user"],
        "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"],
    }
    script = (
        "import mlflow, pathlib, sys\n"
        "mlflow.set_experiment('stack-test')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_param('lr', 0.1); mlflow.log_metric('loss', 1.5)\n"
        "    p = pathlib.Path(sys.argv[1]); p.write_text('hello stack'); mlflow.log_artifact(str(p))\n"
        "print(run.info.run_id)\n"
    )
    logged = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "note.txt")], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert logged.returncode == 0, logged.stderr
    run_id = logged.stdout.split()[-1]
    auth = basic(f"{creds['mlflow_user']}:{creds['mlflow_password']}")
    status_code, raw = request(f"{mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}", headers=auth)
    data = json.loads(raw)["run"]["data"]
    assert status_code == 200 and data["params"] == [{"key": "lr", "value": "0.1"}]
    assert data["metrics"][0]["key"] == "loss" and data["metrics"][0]["value"] == 1.5
    from pipelines.stack import StackConfig, configure_dvc, s3_client

    config = StackConfig.load(clone / "stack.yaml")
    keys = [o["Key"] for o in s3_client(config, creds).list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    assert any(k.endswith(f"{run_id}/artifacts/note.txt") for k in keys), keys

    # Two workers poll the pool.
    status_code, raw = request(
        f"{prefect}/work_pools/{cfg['work_pool']}/workers/filter",
        data={},
        headers=basic(creds["prefect_auth"]),
    )
    assert status_code == 200 and sum(w["status"] == "ONLINE" for w in json.loads(raw)) == 2

    # DVC's remote on the object store: pushed from one clone, pulled byte for byte into another.
    project = tmp_path / "project"
    project.mkdir()
    git("init", "-q", "-b", "main", cwd=project)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=project, check=True)
    payload = os.urandom(300_000)
    (project / "weights.bin").write_bytes(payload)
    subprocess.run([*dvc, "add", "-q", "weights.bin"], cwd=project, check=True)
    git("add", "-A", cwd=project)
    git("commit", "-qm", "data", cwd=project)
    configure_dvc(config, creds, project)
    pushed = subprocess.run([*dvc, "push", "-r", "stack"], cwd=project, capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr
    other = tmp_path / "other"
    git("clone", "-q", str(project), str(other), cwd=tmp_path)
    configure_dvc(config, creds, other)
    pulled = subprocess.run([*dvc, "pull", "-r", "stack"], cwd=other, capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    assert (other / "weights.bin").read_bytes() == payload
    assert (
        "weights.bin"
        not in subprocess.run([*dvc, "status"], cwd=other, capture_output=True, text=True).stdout
    )

    # Down leaves nothing running; up again finds the same data.
    down = stack(clone, "down")
    assert down.returncode == 0 and processes_of(state) == []
    assert stack(clone, "status").returncode == 1
    assert stack(clone, "up").returncode == 0
    status_code, raw = request(f"{mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}", headers=auth)
    assert status_code == 200 and json.loads(raw)["run"]["info"]["run_id"] == run_id
    assert stack(clone, "down").returncode == 0 and processes_of(state) == []
