"""What every stage's ``main()`` needs: one-line errors with exit code 2, and the device choice."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable


def stage_main(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Run a stage's main so that expected failures print one line (``<stage>: error: …``) and exit 2."""

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(fn)
        def run() -> None:
            try:
                fn()
            except (ValueError, RuntimeError, OSError) as exc:
                print(f"{name}: error: {exc}", file=sys.stderr)
                sys.exit(2)

        return run

    return wrap


def resolve_device(device: str) -> str:
    """``auto``: CUDA if present, else the CPU. Under ``torchrun`` each rank takes the GPU of its local rank."""
    import torch  # here, not at import: the stages that never touch a model (download, tokenize) skip its ~2 s

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use 'auto' or 'cpu')")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return device
