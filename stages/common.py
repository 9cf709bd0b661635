"""Small helpers every stage's ``main()`` uses: one-line errors, device choice, loss-curve plots."""

from __future__ import annotations

import csv
import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gptlab.fileio import atomic_write


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
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use 'auto' or 'cpu')")
    return device


def write_history_csv(history: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
    """Loss-curve rows for ``dvc plots`` (one row per logged step; blanks where a metric was not computed)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *columns], extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: row.get(k, "") for k in ["step", *columns]})

    atomic_write(path, write)


@contextmanager
def figure(path: Path, *, title: str, figsize: tuple[float, float] = (6, 4)) -> Iterator[Any]:
    """Yield the axes of a new figure; on exit it is titled, laid out and written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: stages run under DVC/Prefect without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.set_title(title)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def plot_curves(
    history: list[dict[str, Any]], path: Path, columns: list[str], *, title: str, ylabel: str
) -> None:
    """A PNG of the given history columns against step (book ch. 5 ``plot_losses``)."""
    with figure(path, title=title) as ax:
        for col in columns:
            points = [(r["step"], r[col]) for r in history if col in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, label=col)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, *, title: str) -> None:
    """A PNG heat map of a confusion matrix (rows: true class, columns: predicted)."""
    with figure(path, title=title, figsize=(4, 4)) as ax:
        ax.imshow(matrix, cmap="Blues")
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")


def load_splits(
    path: Path,
    *,
    required: tuple[str, ...],
    skip_invalid: bool,
    train_frac: float,
    test_frac: float,
    seed: int,
    shuffle: bool = True,
) -> tuple[list[dict], list[dict], list[dict], int, int]:
    """Read and validate the book's JSON records (every field but ``input`` non-empty), then split them
    into train/test/validation (book ch. 7; shuffled first, seeded, unless ``shuffle`` is false); returns
    (train, test, val, valid records, skipped)."""
    from gptlab.instruct import split_records, validate_records

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    non_empty = tuple(f for f in required if f != "input")
    records, skipped = validate_records(
        data, required=required, non_empty=non_empty, skip_invalid=skip_invalid, source=str(path)
    )
    train, test, val = split_records(
        records, train_frac=train_frac, test_frac=test_frac, seed=seed, shuffle=shuffle
    )
    empty = [name for name, rows in (("train", train), ("test", test), ("validation", val)) if not rows]
    if empty:
        raise ValueError(
            f"{path}: {len(records)} records leave the {'/'.join(empty)} split empty "
            f"(train_frac={train_frac}, test_frac={test_frac}); add records or change the fractions"
        )
    return train, test, val, len(records), skipped
