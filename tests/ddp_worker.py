"""Training runs for tests/test_distributed.py: in-process (one rank), or under ``torchrun`` (each rank).

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py CASES.json

``CASES.json`` is a list of runs, ``{"out", "grad_accum", "checkpoint", "max_steps", "parallelism"}`` each; the
ranks run them one after another in one process group (one launch instead of one per case: the interpreters'
start-up is most of a case's cost). Rank 0 writes each run's history and final weights to its ``out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gptlab import distributed
from gptlab.checkpoint import Checkpointer
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.train import TrainConfig, train


class Batches:
    """The same 8 global batches (4 rows x 16 tokens) in every process, epoch after epoch, resumable."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (8, 4, 17), generator=g)
        self.batches = [(b[:, :-1], b[:, 1:]) for b in x]
        self.position = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def run(
    out: Path,
    grad_accum: int = 1,
    checkpoint: Path | None = None,
    max_steps: int = 8,
    parallelism: str = "ddp",
) -> dict:
    distributed.init_from_env("cpu")
    torch.manual_seed(42)
    model = GPT(GPTConfig.from_name("gpt-nano", context_length=16, dropout=0.0))
    cfg = TrainConfig(
        max_steps=max_steps,
        lr=3e-3,
        min_lr=3e-3,
        decay="constant",
        grad_accum_steps=grad_accum,
        eval_interval=4,
        eval_batches=2,
        log_interval=1,
        checkpoint_interval=4,
        precision="fp32",
        progress=False,
        seed=7,
        parallelism=parallelism,
    )
    result = train(
        model,
        Batches(),
        cfg,
        val_data=Batches(seed=1).batches,
        checkpointer=Checkpointer(checkpoint) if checkpoint is not None else None,
    )
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.json").write_text(json.dumps(result.history))
        torch.save(model.state_dict(), out / "weights.pt")
    return {"history": result.history, "weights": model.state_dict()}


if __name__ == "__main__":
    for case in json.loads(Path(sys.argv[1]).read_text()):
        run(
            Path(case["out"]),
            case.get("grad_accum", 1),
            Path(case["checkpoint"]) if case.get("checkpoint") else None,
            case.get("max_steps", 8),
            case.get("parallelism", "ddp"),
        )
