"""Pretraining throughput: the book's own training step vs gptlab's ``train()`` loop, one process, one table.

    python benchmarks/pretrain_throughput.py [--model gpt2-small] [--context 256] [--batch 2] [--steps 6]
                                             [--device cpu|cuda] [--compile]

The book's step is ch. 5's ``train_model_simple`` inner loop on ch. 4's ``GPTModel`` (PyPI ``llms-from-scratch``):
``calc_loss_batch``, ``backward``, ``AdamW(lr=4e-4, weight_decay=0.1).step()`` in float32. gptlab's row is the
whole loop (:func:`gptlab.train.train`: the window loader, autocast, gradient clipping, the loss kept on the
device, logging), in fp32, in bf16 autocast and, with ``--compile``, bf16 + ``torch.compile``. Every row trains
the same architecture on the same random tokens, after warm-up steps that are not timed. MFU is reported where
the device's peak is known (a table of common GPUs, or ``GPTLAB_PEAK_TFLOPS``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gptlab.batches import ArrayStream, WindowLoader
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.train import TrainConfig, native_bf16, peak_flops, train


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
    rows = [
        (
            "book: GPTModel + AdamW step (fp32)",
            book_step_rate(cfg, batches, args.device, args.warmup, args.steps),
        )
    ]
    rows.append(("gptlab train() fp32", gptlab_rate(cfg, ids, args, "fp32", False)[0]))
    rows.append(("gptlab train() bf16 autocast", gptlab_rate(cfg, ids, args, "bf16", False)[0]))
    if args.compile:
        rows.append(("gptlab train() bf16 + compile", gptlab_rate(cfg, ids, args, "bf16", True)[0]))
    print(f"{'training step':<36} {'tok/s':>9} {'vs book':>8} {'MFU':>7}")
    for name, rate in rows:
        mfu = f"{flops * rate / peak:7.1%}" if peak else f"{'n/a':>7}"
        print(f"{name:<36} {rate:>9.0f} {rate / rows[0][1]:>7.2f}x {mfu}")


if __name__ == "__main__":
    main()
