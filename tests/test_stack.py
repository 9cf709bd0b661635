"""The team stack (pipelines/stack.py) for real on 127.0.0.1: PostgreSQL, SeaweedFS's S3 gateway, the MLflow and
Prefect servers and two workers come up from ``python -m pipelines.stack up`` in a clone and refuse requests
without credentials; ``./run.sh pipeline --stack`` runs the pipeline up to pretraining as deployment runs on the
workers — two at once queue, a worker killed mid-stage marks its run Crashed and the queued run resumes from the
checkpoint while PostgreSQL restarts under it — logging to the tracking server (runs over its REST API,
artifacts in the bucket) and pushing to the DVC remote, from which a fresh clone pulls byte-identical outputs
that an uninterrupted run reproduces; a push while the object store is down fails in one line and succeeds once
it is back; ``down`` leaves no process behind."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from clones import TINY_PRETRAIN, clean_env, git, make_clone, run, set_params

# One module, one stack: its tests run in order in one xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack")]

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
    """``python -m pipelines.stack ARGS`` in the clone. Torch single-threaded in the workers' runs: a threaded BLAS
    may sum in another order in another process, and the test compares a resumed run's bytes with a fresh one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
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


def listening_addresses(state: Path) -> set[str]:
    """The local addresses the stack's processes accept TCP connections on (/proc/net/tcp{,6}, state LISTEN)."""
    inodes = set()
    for entry in processes_of(state):
        pid = entry.split(":")[0]
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table, ipv6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            if ipv6:  # four little-endian 32-bit words
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                found.add(str(ipaddress.IPv6Address(b"".join(words))))
            else:
                found.add(str(ipaddress.IPv4Address(raw[::-1])))
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


def test_the_stack_comes_up_guarded_with_private_credentials(clone: Path) -> None:
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

    # Every service listens on 127.0.0.1 only.
    assert listening_addresses(state) == {"127.0.0.1"}

    # Nothing answers without credentials.
    mlflow, prefect, s3 = cfg["mlflow_url"], cfg["prefect_url"], cfg["s3_url"]
    assert request(f"{mlflow}/api/2.0/mlflow/experiments/search", data={"max_results": 1})[0] == 401
    assert request(f"{prefect}/flows/filter", data={})[0] == 401
    assert request(f"{prefect}/flows/filter", data={}, headers=basic("admin:wrong"))[0] == 401
    assert request(f"{s3}/mlflow-artifacts")[0] == 403

    # Two workers poll the pool.
    status_code, raw = request(
        f"{prefect}/work_pools/{cfg['work_pool']}/workers/filter",
        data={},
        headers=basic(creds["prefect_auth"]),
    )
    assert status_code == 200 and sum(w["status"] == "ONLINE" for w in json.loads(raw)) == 2
    # A run whose machine dies with its worker stops beating: the server's automation will mark it Crashed.
    from pipelines.stack_services import ZOMBIE_AUTOMATION

    status_code, raw = request(f"{prefect}/automations/filter", data={}, headers=basic(creds["prefect_auth"]))
    (zombies,) = [a for a in json.loads(raw) if a["name"] == ZOMBIE_AUTOMATION]
    assert zombies["enabled"] and zombies["actions"][0]["state"] == "CRASHED"


STACK_PARAMS = {
    "pretrain": {
        **TINY_PRETRAIN["pretrain"],
        "train": {
            **TINY_PRETRAIN["pretrain"]["train"],
            "max_steps": 60,
            "eval_interval": 30,
            "checkpoint_interval": 10,
            "log_interval": 10,
        },
    }
}
"""Small enough to be quick, long enough that a worker can be killed between pretraining's checkpoints."""
UP_TO_PRETRAIN = ["download", "tokenize", "pretrain"]


class Watched:
    """A running process whose merged output is read line by line in the background."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> str:
        self.proc.wait(timeout)
        self.thread.join(10)
        return self.text


def on_stack(clone: Path) -> Watched:
    """``./run.sh pipeline --stack --target pretrain`` in the clone, started."""
    proc = subprocess.Popen(
        ["./run.sh", "pipeline", "--stack", "--target", "pretrain"],
        cwd=clone, env=clean_env(clone), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return Watched(proc)


def until(predicate, what: str, timeout: float = 300.0, every: float = 0.05):
    """Poll until ``predicate()`` is truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def worker_running(state: Path, module: str) -> int | None:
    """The pid of the worker whose flow run is running ``python -m <module>``, if one is."""
    import psutil

    for pid_file in sorted((state / "pids").glob("worker-*.pid")):
        with contextlib.suppress(ValueError, OSError, psutil.Error):
            worker = psutil.Process(int(pid_file.read_text()))
            for child in worker.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if module in " ".join(child.cmdline()):
                        return worker.pid
    return None


def outputs_digest(root: Path) -> dict[str, str]:
    """sha256 of every file the stages up to pretrain write (outs, metrics, plots)."""
    import yaml as _yaml

    stages = _yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    rels = [
        p
        for s in UP_TO_PRETRAIN
        for p in stages[s].get("outs", []) + stages[s].get("metrics", []) + stages[s].get("plots", [])
    ]
    files = [f for rel in rels for f in ([root / rel] if (root / rel).is_file() else (root / rel).rglob("*"))]
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()
    }


def test_pipeline_runs_on_a_worker_through_faults_and_pulls_identically(clone: Path, tmp_path: Path) -> None:
    from pipelines.flow import dvc_push
    from pipelines.stack import configure_dvc, reachable
    from pipelines.stack_config import StackConfig
    from pipelines.stack_services import postgres_down, s3_client

    cfg = StackConfig.load(clone / "stack.yaml")
    state = cfg.state_dir
    creds = json.loads((state / "secrets.json").read_text())
    set_params(clone, STACK_PARAMS)
    git("commit", "-qam", "stack params", cwd=clone)
    # The reference: the same commit run uninterrupted, without the stack, meanwhile.
    dvc = [sys.executable, "-m", "dvc"]
    reference = tmp_path / "reference"
    git("clone", "-q", str(clone), str(reference), cwd=tmp_path)
    uninterrupted = subprocess.Popen(
        [*dvc, "repro", "pretrain"], cwd=reference, env=clean_env(reference, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    # Two runs at once: whichever worker polls first, the deployment's concurrency limit queues one behind the
    # other instead of interleaving them in one workspace.
    runs = [on_stack(clone), on_stack(clone)]
    until(lambda: any((clone / "work" / "pretrain").glob("[!.]*")), "pretrain's first checkpoint")
    # kill -9 the worker of the active run, mid-stage: that run is marked Crashed, its stage stopped.
    victim = until(lambda: worker_running(state, "stages.pretrain"), "the worker running pretrain")
    os.kill(victim, signal.SIGKILL)
    crashed = until(lambda: next((r for r in runs if r.proc.poll() is not None), None), "the crash", 120)
    survivor = next(r for r in runs if r is not crashed)
    out = crashed.wait(10)
    assert crashed.proc.returncode == 2 and "pipeline: error: the run ended Crashed" in out, out

    # The queued run now takes the slot on the other worker and resumes pretraining from its checkpoint;
    # PostgreSQL (Prefect's and MLflow's database) stops under it and comes back (with the killed worker).
    until(lambda: "pretrain: resuming from" in survivor.text, "the queued run resuming pretrain", 180)
    postgres_down(cfg)
    restarted = stack(clone, "up")  # the database is back after `up`'s own checks: a few seconds
    assert restarted.returncode == 0 and healthy(restarted.stdout) == 5, restarted.stdout + restarted.stderr
    out = survivor.wait(300)
    assert survivor.proc.returncode == 0, out
    assert "waiting for a worker behind the deployment's active run" in out, out
    assert "pushed to DVC remote 'stack'" in out and "completed on the stack" in out, out
    run_ids = [re.search(r"pipeline (\S+) on the stack", r.text).group(1) for r in (crashed, survivor)]

    # Prefect: one Crashed, one Completed, and the second started only after the first ended.
    auth = basic(creds["prefect_auth"])
    code, raw = request(
        f"{cfg.prefect_url}/flow_runs/filter", data={"flow_runs": {"name": {"any_": run_ids}}}, headers=auth
    )
    by_name = {r["name"]: r for r in json.loads(raw)}
    first, second = (by_name[i] for i in run_ids)
    assert (first["state_type"], second["state_type"]) == ("CRASHED", "COMPLETED")
    assert datetime.fromisoformat(second["start_time"]) >= datetime.fromisoformat(first["end_time"])

    # MLflow, over its REST API: the run's stage run with the stage's metrics; its artifacts are in the bucket.
    mlflow_auth = basic(f"{creds['mlflow_user']}:{creds['mlflow_password']}")
    code, raw = request(f"{cfg.mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=gptlab",
                        headers=mlflow_auth)  # fmt: skip
    assert code == 200, raw
    search = {
        "experiment_ids": [json.loads(raw)["experiment"]["experiment_id"]],
        "filter": f"tags.`gptlab.pipeline_run_id` = '{run_ids[1]}' and tags.`gptlab.stage` = 'pretrain'",
    }
    code, raw = request(f"{cfg.mlflow_url}/api/2.0/mlflow/runs/search", data=search, headers=mlflow_auth)
    (pretrain_run,) = json.loads(raw)["runs"]
    # The crashed run's stage runs, logged before PostgreSQL's restart, are still there.
    before = {**search, "filter": f"tags.`gptlab.pipeline_run_id` = '{run_ids[0]}'"}
    code, raw = request(f"{cfg.mlflow_url}/api/2.0/mlflow/runs/search", data=before, headers=mlflow_auth)
    assert {"download", "tokenize"} <= {
        t["value"] for r in json.loads(raw)["runs"] for t in r["data"]["tags"] if t["key"] == "gptlab.stage"
    }
    assert pretrain_run["info"]["status"] == "FINISHED"
    logged = {m["key"]: m["value"] for m in pretrain_run["data"]["metrics"]}
    written = json.loads((clone / "metrics" / "pretrain.json").read_text())
    shared = [k for k, v in written.items() if isinstance(v, float) and k in logged]
    assert shared and all(logged[k] == pytest.approx(written[k]) for k in shared), (logged, written)
    mlflow_run_id = pretrain_run["info"]["run_id"]
    code, raw = request(f"{cfg.mlflow_url}/api/2.0/mlflow/artifacts/list?run_id={mlflow_run_id}",
                        headers=mlflow_auth)  # fmt: skip
    assert code == 200 and json.loads(raw).get("files"), raw
    keys = [o["Key"] for o in s3_client(cfg, creds).list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    assert any(f"/{mlflow_run_id}/artifacts/" in k for k in keys), keys

    # A fresh clone pulls byte-identical outputs from the stack's remote, and DVC finds them up to date ...
    git("add", "dvc.lock", cwd=clone)
    git("commit", "-qm", "outputs of the run on the stack", cwd=clone)
    other = tmp_path / "other"
    git("clone", "-q", str(clone), str(other), cwd=tmp_path)
    configure_dvc(cfg, creds, other)
    env = clean_env(other)
    run([*dvc, "pull", "-r", "stack", "--with-deps", "pretrain"], other, env)
    pulled = outputs_digest(other)
    assert pulled == outputs_digest(clone) and len(pulled) > 5
    status = run([*dvc, "status", "--with-deps", "pretrain"], other, env).stdout
    assert "Data and pipelines are up to date" in status, status
    # ... and they are what the uninterrupted run made: the crash and the outage changed nothing.
    out, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, out
    fresh = outputs_digest(reference)
    assert fresh == pulled, {k: (v, fresh.get(k)) for k, v in pulled.items() if fresh.get(k) != v}

    # The object store down during a push: one clear line; once it is back, the push succeeds.
    os.killpg(int((state / "pids" / "s3.pid").read_text()), signal.SIGKILL)
    until(lambda: not reachable(cfg)[2][2], "the object store to go", 10)
    with pytest.raises(
        RuntimeError, match=r"dvc push to remote 'stack' failed: Could not connect to the endpoint"
    ):
        dvc_push(str(other), "stack", UP_TO_PRETRAIN)
    assert stack(clone, "up").returncode == 0
    assert dvc_push(str(other), "stack", UP_TO_PRETRAIN)
    assert not [p for p in processes_of(clone) if "stages." in p]  # no stage left running from the killed run


def test_down_leaves_nothing_running(clone: Path) -> None:
    state = Path(yaml.safe_load((clone / "stack.yaml").read_text())["state_dir"])
    down = stack(clone, "down")
    assert down.returncode == 0 and processes_of(state) == []
    assert stack(clone, "status").returncode == 1
