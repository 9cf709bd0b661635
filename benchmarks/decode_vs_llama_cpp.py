"""Decoding speed against llama.cpp on the same weights and prompt (prints a markdown table).

    python benchmarks/decode_vs_llama_cpp.py [--checkpoint DIR] [--precision f32 bf16] [--prompt-tokens 128]
                                             [--new-tokens 128] [--batch 8] [--threads N] [--rounds 3]

The checkpoint (default: the cached SmolLM2-135M-Instruct, ``gptlab fetch-model smollm2-135m-instruct``) is
exported by ``gptlab export gguf`` at each precision and run by llama.cpp itself (node-llama-cpp's prebuilt CPU
build, which ``./run.sh setup`` installs: the engine Ollama runs) and by ``gptlab.generate.stream`` with the KV
cache, both greedy from the same prompt ids, on the same number of threads, never stopping at end-of-text:

* prefill tok/s: prompt tokens ÷ the time to the first new token, one sequence;
* decode tok/s: new tokens after the first ÷ their time, one sequence;
* aggregate tok/s: ``--batch`` sequences decoded together, their new tokens after the first ÷ the time from the
  last sequence's first token to the last token.

Each figure is the best of ``--rounds`` (other load only ever slows a round down). bf16 is measured by default
only where the CPU has native bf16 arithmetic (AVX-512-BF16 or AMX). The f32 greedy tokens of both engines are
compared: the table says how many of the first ``--new-tokens`` agree.

A second table bounds batch-1 decoding from below: the matrix products of one token alone (:func:`products_alone`)
through each kernel at hand, against llama.cpp's whole token — decoding one sequence reads every
weight once per token, so it is memory-bound and the kernel's bandwidth sets the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab.device import native_bf16
from gptlab.formats.gguf_write import export_gguf
from gptlab.formats.wheels import model_dir
from gptlab.generate import stream
from gptlab.load import load_checkpoint, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("llama_cpp_decode.mjs")
ENTRY = Path(sys.prefix) / "llama-cpp" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def cpu_name() -> str:
    flags, name = set(), "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(isa)})"


def llama_cpp(gguf: Path, ids: list[int], new_tokens: int, batch: int, threads: int, rounds: int) -> dict:
    spec = {"tokens": ids, "new_tokens": new_tokens, "batch": batch, "threads": threads, "rounds": rounds}
    proc = subprocess.run(
        ["node", str(SCRIPT), str(ENTRY), str(gguf)],
        input=json.dumps(spec), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def gptlab_rounds(model, ids: list[int], new_tokens: int, batch: int, rounds: int) -> dict:
    """The same measurements as the node script, from :func:`gptlab.generate.stream`."""
    out, results = [], []
    for _ in range(rounds):
        tokens = []
        start = time.perf_counter()
        first = None
        for step in stream(model, [ids] * batch, max_new_tokens=new_tokens):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(step[0]))
        last = time.perf_counter()
        results.append({"start": start, "first": [first] * batch, "last": [last] * batch})
        out = tokens
    return {"rounds": results, "out": out}


def rates(result: dict, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s summed over sequences), each the best over rounds."""
    prefill = decode = 0.0
    for r in result["rounds"]:
        first, last = max(r["first"]), max(r["last"])
        prefill = max(prefill, prompt_tokens / (min(r["first"]) - r["start"]))
        decode = max(decode, len(r["first"]) * (new_tokens - 1) / (last - first))
    return prefill, decode


def products_alone(model, rounds: int) -> dict[str, float]:
    """Seconds for the matrix products of one batch-1 decode step alone (every linear layer once, head included,
    on a fresh (1, in) input), through each CPU kernel at hand: ``F.linear`` on the (out, in) weights gptlab
    keeps (what it runs: MKL), a plain matmul on a (in, out) copy, numpy's matmul on the same memory (the OpenBLAS
    its wheel bundles) and oneDNN's prepacked linear (a private op). The weights stream from memory as in decoding: together they are far larger than the caches."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights]
    transposed = [w.t().contiguous() for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    kernels = {
        "F.linear, (out, in) weights (gptlab)": lambda: [
            torch.nn.functional.linear(x, w) for x, w in zip(xs, weights, strict=True)
        ],
        "matmul, (in, out) copy": lambda: [x @ w for x, w in zip(xs, transposed, strict=True)],
        "numpy's matmul (OpenBLAS), (out, in) weights": lambda: [
            x.numpy() @ w.numpy().T for x, w in zip(xs, weights, strict=True)
        ],
        "oneDNN prepacked linear": lambda: [
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            for x, w in zip(xs, packed, strict=True)
        ],
    }
    best = {}
    for name, step in kernels.items():
        step()  # warm-up
        times = []
        for _ in range(max(rounds, 3)):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        best[name] = min(times)
    best["bytes"] = sum(w.numel() * w.element_size() for w in weights)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--precision", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not ENTRY.is_file() or shutil.which("node") is None:
        sys.exit(f"llama.cpp (npm node-llama-cpp) is not installed at {ENTRY.parents[2]}: run ./run.sh setup")
    checkpoint = args.checkpoint or model_dir("smollm2-135m-instruct")
    if not (checkpoint / "config.json").is_file():
        sys.exit(f"{checkpoint}: no checkpoint (gptlab fetch-model smollm2-135m-instruct)")
    precisions = args.precision or (["f32", "bf16"] if native_bf16("cpu") else ["f32"])
    torch.set_num_threads(args.threads)
    text = (REPO / "data" / "sample" / "corpus.txt").read_text()
    ids = load_tokenizer(checkpoint).encode(text)[: args.prompt_tokens]
    n, B = args.new_tokens, args.batch
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, {checkpoint.name}")
    print(f"prompt {len(ids)} tokens, {n} new tokens, greedy, best of {args.rounds} rounds\n")
    print(f"| precision | engine | prefill tok/s | decode tok/s (batch 1) | aggregate tok/s (batch {B}) |")
    print("|---|---|---:|---:|---:|")
    agreement, alone = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            gguf = export_gguf(
                checkpoint, Path(tmp) / f"model-{precision}.gguf", qtype=precision, modelfile=False
            )
            model, _ = load_checkpoint(checkpoint, dtype=DTYPES[precision])
            gptlab_rounds(model, ids[:8], 4, 1, 1)  # warm-up
            ours1 = gptlab_rounds(model, ids, n, 1, args.rounds)
            oursB = gptlab_rounds(model, ids, n, B, args.rounds)
            theirs1 = llama_cpp(gguf, ids, n, 1, args.threads, args.rounds)
            theirsB = llama_cpp(gguf, ids, n, B, args.threads, args.rounds)
            alone[precision] = products_alone(model, args.rounds)
            del model
            row = {}
            for engine, one, many in (("llama.cpp", theirs1, theirsB), ("gptlab", ours1, oursB)):
                prefill, decode = rates(one, len(ids), n)
                row[engine] = (prefill, decode, rates(many, len(ids), n)[1])
                print(f"| {precision} | {engine} | {prefill:.0f} | {decode:.1f} | {row[engine][2]:.1f} |")
            ratio = [g / ll for g, ll in zip(row["gptlab"], row["llama.cpp"], strict=True)]
            print(
                f"| {precision} | **gptlab ÷ llama.cpp** | {ratio[0]:.2f}× | {ratio[1]:.2f}× | {ratio[2]:.2f}× |"
            )
            same = next(
                (i for i, (a, b) in enumerate(zip(ours1["out"], theirs1["out"], strict=True)) if a != b), n
            )
            agreement.append(f"{precision}: the first {same} of {n} greedy tokens agree")
            alone[precision]["llama.cpp"] = row["llama.cpp"][1]
    print("\n" + "; ".join(agreement))
    print("\nBatch 1: the matrix products of one token alone, by kernel, against llama.cpp's whole token\n")
    print("| precision | what | ms per token | GB/s of weights read | ÷ llama.cpp's whole token |")
    print("|---|---|---:|---:|---:|")
    for precision, result in alone.items():
        theirs = 1 / result.pop("llama.cpp")
        size = result.pop("bytes")
        print(
            f"| {precision} | llama.cpp, the whole token | {theirs * 1e3:.1f} | {size / theirs / 1e9:.1f} | 1.00 |"
        )
        for name, seconds in result.items():
            print(
                f"| {precision} | {name}, products only | {seconds * 1e3:.1f} | {size / seconds / 1e9:.1f} | "
                f"{seconds / theirs:.2f} |"
            )


if __name__ == "__main__":
    main()
