"""Pretraining throughput: the book's own training step vs gptlab's ``train()`` loop, one process, one table.

    python benchmarks/pretrain_throughput.py [--model gpt2-small] [--context 256] [--batch 2] [--steps 6]
                                             [--device cpu|cuda] [--compile]

The book's step is ch. 5's ``train_model_simple`` inner loop on ch. 4's ``GPTModel`` (PyPI ``llms-from-scratch``):
``calc_loss_batch``, ``backward``, ``AdamW(lr=4e-4, weight_decay=0.1).step()`` in float32. gptlab's row is the
whole loop (:func:`gptlab.train.train`: the window loader, autocast, gradient clipping, the loss kept on the
device, logging), in fp32 and, where the device computes bf16 natively, in bf16 autocast and (``--compile``)
bf16 + ``torch.compile``. Every row trains
the same architecture on the same random tokens, after warm-up steps that are not timed. MFU is reported where
the device's peak is known (a table of common GPUs, or ``GPTLAB_PEAK_TFLOPS``), and every row as a percentage of this
device's matmul peak for its precision, measured in the same run: the best of GPT-2-shaped GEMMs (the MLP's and
attention's projections and the head at this batch × context) and a square one, ``torch.matmul`` on the same
threads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gptlab.batches import ArrayStream, WindowLoader
from gptlab.config import GPTConfig
from gptlab.device import native_bf16, peak_flops
from gptlab.model import GPT
from gptlab.train import TrainConfig, train


def book_step_rate(cfg: GPTConfig, batches, device: str, warmup: int, steps: int) -> float:
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch05 import calc_loss_batch

    book_cfg = {
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        "emb_dim": cfg.n_embd,
        "n_heads": cfg.n_head,
        "n_layers": cfg.n_layer,
        "drop_rate": cfg.dropout,
        "qkv_bias": cfg.qkv_bias,
    }
    torch.manual_seed(123)
    model = GPTModel(book_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    model.train()
    tokens, start = 0, 0.0
    for i, (x, y) in enumerate(batches[: warmup + steps]):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        optimizer.zero_grad()
        loss = calc_loss_batch(x, y, model, device)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            tokens += x.numel()
    loss.item()  # the book reads the loss on the host; wait for the device here as well
    return tokens / (time.perf_counter() - start)


def matmul_peak(cfg: GPTConfig, tokens: int, dtype: torch.dtype, device: str, repeat: int = 5) -> float:
    """This device's measured matmul FLOP/s in ``dtype``: the best over the training step's GEMM shapes
    (tokens × n_embd × {3, 4}·n_embd, tokens × 4·n_embd × n_embd, tokens × n_embd × vocab) and a square 2048³."""
    C = cfg.n_embd
    shapes = [(tokens, C, 3 * C), (tokens, C, 4 * C), (tokens, 4 * C, C), (tokens, C, cfg.vocab_size)]
    best = 0.0
    for m, k, n in [*shapes, (2048, 2048, 2048)]:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        torch.matmul(a, b)  # warm-up: thread pool, kernel selection
        for _ in range(repeat):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.matmul(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def gptlab_rate(cfg: GPTConfig, ids, args, precision: str, compile_model: bool) -> tuple[float, GPT]:
    torch.manual_seed(123)
    model = GPT(cfg)
    common = dict(
        lr=4e-4,
        min_lr=4e-4,
        decay="constant",
        weight_decay=0.1,
        eval_interval=0,
        log_interval=1000,
        progress=False,
        precision=precision,
        compile=compile_model,
    )

    def loader():
        stream = ArrayStream(ids, "train")
        return WindowLoader(stream, context_length=cfg.context_length, batch_size=args.batch, seed=1)

    train(model, loader(), TrainConfig(max_steps=args.warmup, **common), device=args.device)  # warm-up
    result = train(model, loader(), TrainConfig(max_steps=args.steps, **common), device=args.device)
    return result.tokens_per_sec, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="add a bf16 + torch.compile row")
    args = parser.parse_args()

    torch.manual_seed(0)
    # The book's pretraining model: dropout 0.1, no qkv bias (ch. 5's GPT_CONFIG_124M with context 256).
    cfg = GPTConfig.from_name(
        args.model, context_length=args.context, dropout=0.1, qkv_bias=False, tie_weights=False
    )
    n_tokens = (args.warmup + args.steps) * args.batch * args.context + args.context + 1
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, n_tokens)
    windows = torch.from_numpy(
        ids[: n_tokens - 1].reshape(-1, args.context)[: (args.warmup + args.steps) * args.batch]
    )
    targets = torch.from_numpy(
        ids[1:n_tokens].reshape(-1, args.context)[: (args.warmup + args.steps) * args.batch]
    )
    batches = list(zip(windows.split(args.batch), targets.split(args.batch), strict=True))

    peak = peak_flops(torch.device(args.device))
    flops = GPT(GPTConfig.from_name(args.model, context_length=args.context)).flops_per_token(args.context)
    print(
        f"{args.model}, context {args.context}, batch {args.batch}, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, native bf16: {native_bf16(torch.device(args.device).type)}"
    )
    # Without native bf16 (AVX2-only CPUs) bf16 matmuls take a slow single-threaded fallback: not worth timing.
    bf16 = native_bf16(torch.device(args.device).type)
    precisions = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16 else {})}
    measured = {p: matmul_peak(cfg, args.batch * args.context, d, args.device) for p, d in precisions.items()}
    print("measured matmul peak: " + ", ".join(f"{p} {f / 1e9:.0f} GFLOP/s" for p, f in measured.items()))
    rows = [
        (
            "book: GPTModel + AdamW step (fp32)",
            "fp32",
            book_step_rate(cfg, batches, args.device, args.warmup, args.steps),
        )
    ]
    rows.append(("gptlab train() fp32", "fp32", gptlab_rate(cfg, ids, args, "fp32", False)[0]))
    if bf16:
        rows.append(("gptlab train() bf16 autocast", "bf16", gptlab_rate(cfg, ids, args, "bf16", False)[0]))
    if args.compile and bf16:
        rows.append(("gptlab train() bf16 + compile", "bf16", gptlab_rate(cfg, ids, args, "bf16", True)[0]))
    print(f"{'training step':<36} {'tok/s':>9} {'vs book':>8} {'GFLOP/s':>8} {'% peak':>7} {'MFU':>7}")
    for name, precision, rate in rows:
        mfu = f"{flops * rate / peak:7.1%}" if peak else f"{'n/a':>7}"
        achieved = flops * rate
        print(
            f"{name:<36} {rate:>9.0f} {rate / rows[0][2]:>7.2f}x {achieved / 1e9:>8.0f} "
            f"{achieved / measured[precision]:>7.1%} {mfu}"
        )
    print(
        "% peak: the row's FLOP/s (6N + attention per token, PaLM appendix B) over the measured matmul peak of"
    )
    print("its precision; MFU: over the device's nominal peak.")


if __name__ == "__main__":
    main()
