"""Stage plots and curve tables: loss/accuracy curves (PNG for people, CSV for ``dvc plots``), confusion matrices."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptlab.fileio import atomic_write


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
