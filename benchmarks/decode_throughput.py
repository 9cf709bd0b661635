"""Decoding throughput with and without the KV cache (prints a table).

    python benchmarks/decode_throughput.py [--model gpt-mini] [--batch 1 4] [--new-tokens 128] [--device cpu]

Both paths produce identical greedy tokens (tests/test_generate.py); this measures what the cache buys.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptlab.config import GPTConfig
from gptlab.generate import generate
from gptlab.model import GPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-mini")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.model)).to(args.device).eval()
    print(
        f"{args.model}: {model.num_params() / 1e6:.1f}M params, device {args.device}, torch {torch.__version__}"
    )
    print(f"{'batch':>5} {'cache':>6} {'new tok/s':>10} {'seconds':>8}")
    for batch in args.batch:
        prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens)).tolist()
        for use_cache in (False, True):
            generate(model, prompts, max_new_tokens=4, use_cache=use_cache)  # warm-up
            start = time.perf_counter()
            generate(model, prompts, max_new_tokens=args.new_tokens, use_cache=use_cache)
            seconds = time.perf_counter() - start
            print(
                f"{batch:>5} {str(use_cache):>6} {batch * args.new_tokens / seconds:>10.1f} {seconds:>8.2f}"
            )


if __name__ == "__main__":
    main()
