"""What every stage's ``main()`` needs: expected failures as one line, bugs with their traceback, and the stage's
progress lines.

A stage's pure function reports through ``logging`` (:func:`stage_log`), never ``print``: called from a test or a
notebook it stays quiet unless the caller configures logging; run as ``python -m stages.<name>`` its messages
print as ``<stage>: …`` lines on stdout (the lines ``./run.sh pipeline`` shows on the terminal).
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable

from gptlab.errors import UserError

__all__ = ["UserError", "stage_log", "stage_main"]


def stage_log(name: str) -> logging.Logger:
    """The logger a stage's code reports its progress and results through."""
    return logging.getLogger(f"stages.{name}")


class _Progress(logging.StreamHandler):
    """``<stage>: message`` lines on the current ``sys.stdout`` (looked up per line, so a test's capture works)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "stages.progress"

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _show_progress(name: str) -> None:
    logger = logging.getLogger("stages")
    handler = next((h for h in logger.handlers if isinstance(h, _Progress)), None)
    if handler is None:  # once per process: a second stage_main in one process (the tests) reuses it
        handler = _Progress()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
    logger.setLevel(logging.INFO)


def stage_main(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Run a stage's main: a :class:`UserError` (or an OS error naming its file) prints one line
    ``<stage>: error: …`` and exits 2; anything else is a bug: its traceback goes to stderr (DVC's output, the
    pipeline's log) followed by a one-line summary, exit 1."""

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(fn)
        def run() -> None:
            _show_progress(name)
            try:
                fn()
            except UserError as exc:
                print(f"{name}: error: {exc}", file=sys.stderr)
                sys.exit(2)
            except OSError as exc:
                if exc.filename is None:
                    _bug(name, exc)
                print(f"{name}: error: {exc}", file=sys.stderr)
                sys.exit(2)
            except Exception as exc:  # noqa: BLE001 - reported with its traceback, then the exit status says so
                _bug(name, exc)

        return run

    return wrap


def _bug(name: str, exc: BaseException) -> None:
    traceback.print_exc()
    first = str(exc).splitlines()[0] if str(exc) else ""
    print(
        f"{name}: error: unexpected {type(exc).__name__}: {first} (a bug, not bad input: traceback above)",
        file=sys.stderr,
    )
    sys.exit(1)
