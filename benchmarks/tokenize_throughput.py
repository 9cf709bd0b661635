"""Tokenize-stage throughput and memory on a larger corpus (prints a table).

    python benchmarks/tokenize_throughput.py [--corpus ../shared/datasets/middlemarch.txt] [--workers 1 2]

Peak RSS is measured in a fresh child process per configuration, so the numbers don't mix.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from stages.tokenize import TokenizeParams, tokenize_corpus
corpus, out, workers, chunk = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
manifest = tokenize_corpus(corpus, out, TokenizeParams(workers=workers, chunk_chars=chunk), progress=False)
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens": manifest["num_tokens"], "seconds": seconds, "rss_mb": rss}))
"""


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", type=Path, default=root.parent / "shared" / "datasets" / "middlemarch.txt"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-chars", type=int, default=1 << 18)
    args = parser.parse_args()

    size = args.corpus.stat().st_size
    print(f"corpus {args.corpus.name}: {size / 1e6:.2f} MB, chunk {args.chunk_chars} chars")
    print(f"{'workers':>7} {'tokens':>9} {'seconds':>8} {'tok/s':>10} {'peak RSS MB (parent)':>21}")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                str(args.corpus),
                f"{tmp}/tokens",
                str(workers),
                str(args.chunk_chars),
            ]
            out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"{workers:>7} {r['tokens']:>9} {r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>10.0f} {r['rss_mb']:>21.0f}"
            )


if __name__ == "__main__":
    main()
