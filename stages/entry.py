"""What every stage's ``main()`` needs: one-line errors with exit code 2, and the device choice."""

from __future__ import annotations

import functools
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
