"""Multi-process training from ``dvc repro``: a stage whose params ask for more than one process relaunches
itself under ``torchrun`` (PyTorch's elastic launcher), so DVC's command line stays the entry point.

One node: ``launch.nproc_per_node: 8`` runs 8 ranks (one per GPU; gloo processes on a CPU). Several nodes: the
same ``dvc repro`` on every node with ``nnodes: N`` and ``rdzv_endpoint: host:port`` (the first node's address);
each node runs its ``nproc_per_node`` ranks and they meet there (``torchrun --rdzv-backend c10d``). Rank 0 writes
the outputs and logs to MLflow; the others train in lockstep and write nothing (:mod:`gptlab.distributed`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

from gptlab.errors import UserError

_NOISE = re.compile(r"^(\*+|Setting OMP_NUM_THREADS.*|[EWI]\d{4} \d\d:\d\d:\d\d.*)$")


@dataclass
class LaunchParams:
    nproc_per_node: int = 1
    """Processes (ranks) on this node; more than 1 relaunches the stage under ``torchrun``."""
    nnodes: int = 1
    """Nodes taking part; each runs the same command."""
    rdzv_endpoint: str | None = None
    """``host:port`` where the nodes meet (needed when ``nnodes > 1``)."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise UserError(
                f"nproc_per_node and nnodes must be >= 1, got {self.nproc_per_node} and {self.nnodes}"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError("nnodes > 1 needs rdzv_endpoint (host:port of the first node)")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(stage: str, launch: LaunchParams) -> int | None:
    """Run ``python -m stages.<stage> <same arguments>`` under ``torchrun`` when ``launch`` asks for more than one
    process and this is not already a rank; its exit code (2 with the ranks' one-line error on failure), or None
    when the caller should run the stage itself."""
    if launch.world_size == 1 or under_torchrun():
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc_per_node}"]
    if launch.nnodes > 1:
        cmd += [f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", f"stages.{stage}", *sys.argv[1:]]
    print(f"{stage}: {launch.world_size} processes (torchrun, {launch.nnodes} node(s))", file=sys.stderr)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    error, launcher_failed = None, False
    assert proc.stderr is not None
    for line in proc.stderr:  # the ranks' own lines pass through; the launcher's banner and traceback do not
        text = line.rstrip("\n")
        if text.startswith("Traceback (most recent call last):") and error is not None:
            launcher_failed = True
        if launcher_failed or _NOISE.match(text):
            continue
        if text.startswith(f"{stage}: error: "):
            if error is not None:
                continue  # every rank reports the same failure: once is enough
            error = text
        print(text, file=sys.stderr, flush=True)
    code = proc.wait()
    if code != 0 and error is None:
        print(f"{stage}: error: a training process failed (torchrun exit code {code})", file=sys.stderr)
    return 0 if code == 0 else 2


def prepare(stage: str, launch: LaunchParams, device: str) -> str:
    """A training stage's start: relaunch under ``torchrun`` when asked (the launching process exits here with
    the ranks' exit code), else join the ranks' process group; returns this process's device."""
    from gptlab import distributed

    code = relaunch(stage, launch)
    if code is not None:
        sys.exit(code)
    resolved = resolve_device(device)
    distributed.init_from_env(resolved.split(":")[0])
    return resolved


def resolve_device(device: str) -> str:
    """``auto``: CUDA if present, else the CPU. Under ``torchrun`` each rank takes the GPU of its local rank."""
    import torch  # here, not at import: the stages that never touch a model (download, tokenize) skip its ~2 s

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available (use 'auto' or 'cpu')")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return device
