"""Memory per process of data-parallel training: one process, DDP and FSDP2 under ``torchrun`` (gloo, CPU).

    python benchmarks/distributed_memory.py [--model gpt2-small] [--nproc 2] [--steps 3]

Each run trains ``--steps`` optimizer steps of GPT-2 (fp32, AdamW, context 128, a global batch of 2 rows per
process) through :func:`gptlab.train.train` and reports every process's peak resident memory above what it
held before the model was built (torch and the process group loaded; glibc told to return freed blocks, so the
figure follows live tensors). A table, reference measured in the same
run: DDP keeps a whole copy of the weights, gradients and AdamW's two moments in every process (plus its
gradient buckets); FSDP2 keeps 1/N of each, gathering one block's weights at a time for the forward and backward,
and the whole weights once more at evaluation and checkpoint steps (:func:`gptlab.distributed.copy_full_weights`,
so that evaluation and saving read an ordinary model): that copy is in the FSDP figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(model_name: str, steps: int, parallelism: str, out: Path) -> None:
    import torch

    from gptlab import distributed
    from gptlab.config import GPTConfig
    from gptlab.model import GPT
    from gptlab.train import TrainConfig, train

    distributed.init_from_env("cpu")
    world = distributed.world_size()
    base = _rss_mb()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(model_name, context_length=128, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (steps, 2 * world, 129), generator=g)
    batches = [(b[:, :-1], b[:, 1:]) for b in x]

    class Source(list):
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    cfg = TrainConfig(
        max_steps=steps,
        eval_interval=0,
        log_interval=steps,
        precision="fp32",
        progress=False,
        parallelism=parallelism,
        warmup_steps=0,
    )
    result = train(model, Source(batches), cfg)
    peaks = [torch.tensor(_rss_mb() - base)]
    if world > 1:
        import torch.distributed as dist

        gathered = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(gathered, peaks[0].reshape(1))
        peaks = gathered
    if distributed.is_main():
        out.write_text(
            json.dumps(
                {
                    "peaks": [float(p) for p in peaks],
                    "params_mb": model.num_params() * 4 / 2**20,
                    "tokens_per_sec": result.tokens_per_sec,
                }
            )
        )


def launch(model_name: str, steps: int, nproc: int, parallelism: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [
            __file__,
            "--worker",
            "--model",
            model_name,
            "--steps",
            str(steps),
            "--parallelism",
            parallelism,
        ]
        args += ["--out", str(out)]
        # Large blocks are mmapped and returned to the system when freed, so resident memory follows the live
        # tensors instead of glibc's high-water heap.
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "MALLOC_MMAP_THRESHOLD_": "131072",
        }
        if nproc == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
                *args,
            ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"distributed_memory: {parallelism} run failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallelism", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.steps, args.parallelism, args.out)
        return
    runs = [("1 process", 1, "ddp"), ("DDP", args.nproc, "ddp"), ("FSDP2", args.nproc, "fsdp")]
    print(f"{args.model}, fp32 AdamW, context 128, 2 rows per process, {args.steps} steps, gloo on CPU")
    print("| run | processes | peak MB above start, per process | vs one process |")
    print("|---|---|---|---|")
    reference = None
    for label, nproc, parallelism in runs:
        r = launch(args.model, args.steps, nproc, parallelism)
        peak = max(r["peaks"])
        reference = reference or peak
        per = " / ".join(f"{p:,.0f}" for p in r["peaks"])
        print(f"| {label} | {nproc} | {per} | {peak / reference:.2f}x |", flush=True)
    print(f"(weights alone: {r['params_mb']:,.0f} MB in fp32)")


if __name__ == "__main__":
    main()
