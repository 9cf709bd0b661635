"""Training loop: AdamW, warmup + cosine decay, gradient accumulation and clipping, eval, exact resume.

Grows the book's ``train_model_simple`` (ch. 5) and its appendix D extras (linear warmup, cosine decay,
gradient clipping) into a loop that resumes bit-exactly on CPU. Optimizer grouping (no weight decay on biases,
norms and embeddings) follows nanoGPT's ``configure_optimizers`` and Loshchilov & Hutter, "Decoupled Weight
Decay Regularization" (2019).

This module does no file I/O: checkpoints go through an injected object with ``save(model, state)`` and
``load_state()`` (:class:`gptlab.checkpoint.Checkpointer`), metrics through a callback.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gptlab import distributed
from gptlab.device import autocast_context, peak_flops, peak_memory_mb, resolve_precision
from gptlab.errors import UserError

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
MetricsCallback = Callable[[int, dict[str, float]], None]


class BatchSource(Protocol):
    """An epoch iterable that can report and restore its position (e.g. :class:`gptlab.batches.WindowLoader`)."""

    def __iter__(self) -> Iterator[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointSink(Protocol):
    def save(self, model: nn.Module, training_state: dict[str, Any]) -> None: ...
    def load_state(self) -> dict[str, Any] | None: ...
    def load_weights(self, model: nn.Module) -> None: ...


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is left untouched."""


@dataclass
class TrainConfig:
    """Optimisation settings of one run (stages fill these from their params section)."""

    max_steps: int | None = 1000
    """Optimizer steps (each is ``grad_accum_steps`` micro-batches). Set this or ``epochs``."""
    epochs: int | None = None
    """Passes over the training data (needs a sized batch source); replaces ``max_steps`` when set."""
    lr: float = 4e-4
    """Peak learning rate."""
    min_lr: float = 4e-5
    """Floor reached by the cosine decay at ``max_steps``."""
    warmup_steps: int = 0
    """Linear warmup from 0 to ``lr``."""
    decay: str = "cosine"
    """``cosine`` (decay to ``min_lr``) or ``constant`` (the book's chapters 5-7 train at a constant lr)."""
    weight_decay: float = 0.1
    weight_decay_scope: str = "matrices"
    """``matrices``: decay the weight matrices of linear layers only, not biases, norms and embeddings
    (GPT-2, nanoGPT); ``all``: every parameter, as the book's ``AdamW(model.parameters(), weight_decay=0.1)``."""
    betas: tuple[float, float] = (0.9, 0.95)
    fused: bool | None = None
    """AdamW as one fused kernel (None: yes, on CPU and CUDA, 1.5-2x faster steps on CPU); False: torch's default
    per-tensor update, which the book's ``torch.optim.AdamW(...)`` uses (the book profile, for its exact numbers)."""
    grad_accum_steps: int = 1
    grad_clip: float | None = 1.0
    """Max global gradient norm; None disables clipping."""
    eval_interval: int = 100
    """Evaluate every this many steps (and at the end); 0 disables periodic eval."""
    eval_first: bool = False
    """Also evaluate after the first step and count ``eval_interval`` from there: steps 1, 1 + k, 1 + 2k, …
    (the book's ``global_step % eval_freq == 0`` with a 0-based ``global_step``)."""
    eval_batches: int | None = 20
    """Batches per evaluation (None: the whole validation set)."""
    eval_train: bool = False
    """At each evaluation also measure ``train_loss`` as the book's ``calc_loss_loader``: in eval mode, over the
    first ``eval_batches`` batches of a fresh pass over the training data. Otherwise ``train_loss`` is the
    mean of the training steps' losses since the last log."""
    checkpoint_interval: int = 0
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    log_interval: int = 10
    seed: int = 123
    """The section's one seed: training's RNGs and, in the stages, its splits, shuffles and new weights."""
    reseed: bool = True
    """Seed torch's and Python's RNGs with ``seed`` when training starts. False continues the stream the caller
    left: the book seeds once, before building the model, so its dropout masks follow the initialisation."""
    precision: str = "auto"
    """``auto``: bf16 autocast where the hardware computes bf16 natively (CUDA GPUs with bf16; CPUs with AMX or
    AVX512-BF16, as torch reports them), else fp32; or ``bf16`` / ``fp32`` explicitly."""
    compile: bool | None = None
    """Wrap the model in ``torch.compile``; None: on CUDA only (on CPU compiling costs more than it saves)."""
    parallelism: str = "ddp"
    """With several processes (``torchrun``): ``ddp`` (every rank holds the whole model, gradients all-reduced)
    or ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded over the ranks). One process: unused."""
    progress: bool | None = None
    """Show a progress bar: True, False, or None for only on a terminal (display only: not a result param)."""

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise UserError(
                f"set exactly one of max_steps and epochs (got {self.max_steps} and {self.epochs})"
            )
        for name in ("max_steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be > 0, got {value}")
        if self.grad_accum_steps <= 0:
            raise UserError(f"grad_accum_steps must be > 0, got {self.grad_accum_steps}")
        if self.decay not in ("cosine", "constant"):
            raise UserError(f"decay must be 'cosine' or 'constant', got {self.decay!r}")
        if self.eval_first and not self.eval_interval:
            raise UserError("eval_first needs eval_interval > 0 (it shifts the periodic evaluations)")
        if self.weight_decay_scope not in ("matrices", "all"):
            raise UserError(
                f"weight_decay_scope must be 'matrices' or 'all', got {self.weight_decay_scope!r}"
            )
        if self.parallelism not in ("ddp", "fsdp"):
            raise UserError(f"parallelism must be 'ddp' or 'fsdp', got {self.parallelism!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.warmup_steps < 0 or (self.max_steps is not None and self.warmup_steps > self.max_steps):
            raise UserError(f"warmup_steps must be in [0, max_steps], got {self.warmup_steps}")
        if self.min_lr > self.lr:
            raise UserError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        self.betas = tuple(self.betas)  # YAML gives lists


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    train_loss: float
    val_loss: float | None
    tokens_per_sec: float | None
    """Training throughput of this call (None when it trained no step: a run resumed at its end)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per log/eval event: step, lr, train_loss, grad_norm, val_loss, tokens_seen, ..."""
    precision: str = "fp32"
    """The precision used: ``bf16`` (autocast) or ``fp32``."""


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over (input, target) batches; targets of -100 are ignored (book ch. 5/7)."""
    x, y = batch
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr`` or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def is_eval_step(step: int, cfg: TrainConfig) -> bool:
    """Whether to evaluate after optimizer step ``step`` (1-based); the last step always evaluates."""
    if not cfg.eval_interval:
        return False
    offset = 1 if cfg.eval_first else 0
    return step >= offset and (step - offset) % cfg.eval_interval == 0


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW; with ``weight_decay_scope: matrices`` biases, norms and embeddings are not decayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied tensor once
    if cfg.weight_decay_scope == "all":
        groups = [{"params": trainable, "weight_decay": cfg.weight_decay}]
    else:
        no_decay_ids = set()
        for module in model.modules():
            if isinstance(module, nn.Embedding | nn.LayerNorm):
                no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        decay, no_decay = [], []
        for p in trainable:
            (no_decay if id(p) in no_decay_ids or p.dim() < 2 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    fused = device_type in ("cuda", "cpu") if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn = lm_loss,
    *,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> float:
    """Mean loss over up to ``max_batches`` batches (book ch. 5 ``calc_loss_loader``); ``precision`` as
    :attr:`TrainConfig.precision` (training passes its own)."""
    was_training = model.training
    model.eval()
    device_type = torch.device(device).type
    # A resumable loader must not be moved by evaluation, so every eval sees the same batches.
    position = batches.state_dict() if hasattr(batches, "state_dict") else None
    total, n = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            with autocast_context(precision, device_type):
                total += float(loss_fn(model, to_device(batch, device)))
            n += 1
    finally:
        if position is not None:
            batches.load_state_dict(position)
        model.train(was_training)
    if n == 0:
        raise UserError("evaluation data yielded no batches")
    return total / n


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    if isinstance(batch, torch.Tensor):
        if torch.device(device).type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # page-locked: the copy below runs asynchronously
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _count_tokens(batch: Batch) -> int:
    first = batch[0] if isinstance(batch, tuple | list) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return first.numel() if isinstance(first, torch.Tensor) else 0


def _seq_len(batch: Batch) -> int:
    first = batch[0] if isinstance(batch, tuple | list) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return first.shape[-1] if isinstance(first, torch.Tensor) and first.dim() > 1 else 0


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _batches_forever(source: BatchSource) -> Iterator[Batch]:
    while True:
        produced = False
        for batch in source:
            produced = True
            yield batch
        if not produced:
            raise UserError("training data yielded no batches")


# --- the training loop: setup, one optimization step, evaluation, checkpoint ----------------------------------
#
# train() below reads as the book's train_model_simple (ch. 5) with appendix D's train_model extras: set the
# step's learning rate, accumulate gradients over micro-batches, clip, step the optimizer, then log, evaluate and
# checkpoint when due. The helpers between here and train() are those steps; they share a _Run (what is fixed for
# the call: the wrapped model, the optimizer, the device) and a _Progress (what a step changes; a checkpoint saves
# its counters).


@dataclass
class _Run:
    """The fixed parts of one :func:`train` call, built once by :func:`_setup`."""

    cfg: TrainConfig
    """The caller's config with ``epochs`` turned into ``max_steps`` (a checkpoint records this one)."""
    device: torch.device
    precision: str
    """``bf16`` or ``fp32``: :attr:`TrainConfig.precision` resolved for the device."""
    model: nn.Module
    """The caller's module. Under FSDP its weights are whole only while evaluation or a checkpoint reads them."""
    trained: nn.Module
    """The module the optimizer updates: ``model`` itself, or under FSDP its sharded copy."""
    ddp: nn.Module
    """``trained``, or (several ranks, ``parallelism: ddp``) its DistributedDataParallel wrapper, whose
    ``no_sync()`` skips the gradient all-reduce of the micro-batches before the last."""
    fwd: nn.Module
    """``ddp``, compiled or not: what the forward pass calls."""
    optimizer: torch.optim.Optimizer
    world: int
    rank: int
    fsdp: bool
    peak: float | None
    """The device's peak FLOP/s (:func:`peak_flops`), for MFU; None when unknown."""
    flops_per_token: Callable[[int], float] | None
    """Training FLOPs per token at a sequence length, when the model can say (read while its weights are whole)."""


@dataclass
class _Progress:
    """What changes from step to step: the resumable counters a checkpoint saves, and the current log window."""

    step: int = 0
    """Optimizer steps taken so far."""
    tokens_seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    last_good: int | None = None
    """Step of the newest checkpoint on disk (None: none yet), named when a non-finite loss stops the run."""
    window: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(step, loss, grad norm) of the steps since the last log row. The tensors stay on the device until a log
    step, a checkpoint or the end reads them: no host synchronisation per step."""
    window_tokens: int = 0
    t0: float = 0.0
    """When the current log window started (``time.perf_counter``)."""


def _setup(
    model: nn.Module,
    train_data: BatchSource,
    cfg: TrainConfig,
    device: torch.device,
    checkpointer: CheckpointSink | None,
) -> tuple[_Run, _Progress]:
    """Everything before the first step: step count, seeds, precision, weights (resumed ones included), the
    distributed wrapping, the optimizer and, when resuming, the optimizer, data position, counters and RNGs.

    The order matters for exact resume: the RNGs are seeded before anything draws from them and restored last,
    after everything that reads the checkpoint.
    """
    if cfg.epochs is not None:
        # Each optimizer step consumes grad_accum_steps batches.
        steps = math.ceil(cfg.epochs * len(train_data) / cfg.grad_accum_steps)
        cfg = dataclasses.replace(cfg, max_steps=steps, epochs=None)
    if cfg.reseed:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    precision = resolve_precision(cfg.precision, device.type)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for what stays in fp32
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    resumed = checkpointer.load_state() if checkpointer is not None else None
    if resumed is not None:
        checkpointer.load_weights(model)
        model.to(device)
    # Read now, while the weights are whole (FSDP releases them below).
    flops_per_token = _flops_per_token_fn(model)
    world, rank = distributed.world_size(), distributed.rank()
    fsdp = world > 1 and cfg.parallelism == "fsdp"
    trained = distributed.shard_model(model) if fsdp else model
    if fsdp:
        distributed.release_weights(model)
    optimizer = configure_optimizer(trained, cfg, device.type)
    progress = _Progress()
    if resumed is not None:
        _restore(resumed, progress, trained, optimizer, train_data, fsdp, checkpointer)
    ddp, fwd = _wrap_for_forward(model, trained, cfg, device, world, fsdp)
    run = _Run(
        cfg=cfg,
        device=device,
        precision=precision,
        model=model,
        trained=trained,
        ddp=ddp,
        fwd=fwd,
        optimizer=optimizer,
        world=world,
        rank=rank,
        fsdp=fsdp,
        peak=peak_flops(device),
        flops_per_token=flops_per_token,
    )
    return run, progress


def _flops_per_token_fn(model: nn.Module) -> Callable[[int], float] | None:
    """The model's FLOPs per token as a function of the sequence length, or None if it cannot say.

    Affine in the sequence length (6N + 12·L·H·Q·T, nanoGPT's estimate), so two reads give every length.
    """
    if not hasattr(model, "flops_per_token"):
        return None
    f1, f2 = model.flops_per_token(1), model.flops_per_token(2)

    def flops_per_token(seq_len: int) -> float:
        return f1 + (f2 - f1) * (seq_len - 1)

    return flops_per_token


def _restore(
    resumed: dict[str, Any],
    progress: _Progress,
    trained: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: BatchSource,
    fsdp: bool,
    checkpointer: CheckpointSink,
) -> None:
    """Resume from a checkpoint's training state (:func:`_snapshot`): optimizer moments, data position, counters
    and, last, the RNG streams, so the next step draws the dropout masks the uninterrupted run would have."""
    layout = resumed.get("optimizer_layout", "replicated")
    if layout != ("sharded" if fsdp else "replicated"):
        raise UserError(
            f"{getattr(checkpointer, 'directory', 'the checkpoint')}: written by a "
            f"{'parallelism: fsdp' if layout == 'sharded' else 'single-process or ddp'} run; resume it the same way"
        )
    if fsdp:
        distributed.load_full_optimizer_state(trained, optimizer, resumed["optimizer"])
    else:
        optimizer.load_state_dict(resumed["optimizer"])
    train_data.load_state_dict(resumed["data"])
    progress.step, progress.tokens_seen = resumed["step"], resumed["tokens_seen"]
    progress.history = resumed["history"]
    _set_rng_state(resumed["rng"])
    progress.last_good = progress.step  # the checkpoint just read is on disk


def _wrap_for_forward(
    model: nn.Module, trained: nn.Module, cfg: TrainConfig, device: torch.device, world: int, fsdp: bool
) -> tuple[nn.Module, nn.Module]:
    """``(ddp, fwd)``: the DistributedDataParallel wrapper (or ``trained``) and what the forward pass calls (it,
    through ``torch.compile`` where enabled)."""
    compile_model = cfg.compile if cfg.compile is not None else device.type == "cuda"
    ddp = trained
    if world > 1 and not fsdp:  # data parallel: gradients averaged across ranks inside backward()
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(ddp) if compile_model else ddp
    return ddp, fwd


def _optimization_step(
    run: _Run, progress: _Progress, batches: Iterator[Batch], loss_fn: LossFn, lr: float
) -> int:
    """One optimizer step at learning rate ``lr`` (the body of the book's ch. 5 loop, with appendix D's gradient
    clipping): accumulate the gradient of ``grad_accum_steps`` micro-batches, clip its global norm, step AdamW.

    Appends (step, loss, grad norm) to the log window; returns the last micro-batch's sequence length (for MFU).
    """
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss, seq_len = _accumulate_gradients(run, progress, batches, loss_fn)
    # The norm before clipping (an infinite bound clips nothing), logged as grad_norm.
    bound = run.cfg.grad_clip if run.cfg.grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trained.parameters(), bound)  # () over all parameters
    if run.fsdp:
        grad_norm = grad_norm.full_tensor()  # the sharded norm, reduced over ranks
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.window.append((progress.step, step_loss, grad_norm.detach()))
    return seq_len


def _accumulate_gradients(
    run: _Run, progress: _Progress, batches: Iterator[Batch], loss_fn: LossFn
) -> tuple[torch.Tensor, int]:
    """Forward and backward ``grad_accum_steps`` micro-batches; ``(step loss, seq_len)``.

    Each micro-batch's loss is scaled by ``1 / grad_accum_steps`` before backward, so the summed gradient is that
    of their mean: the gradient of one batch ``grad_accum_steps`` times as large. The step loss is that mean too.
    """
    cfg = run.cfg
    step_loss = torch.zeros((), device=run.device)  # (): stays on the device, no host sync
    seq_len = 0
    for micro in range(cfg.grad_accum_steps):
        global_batch = next(batches)  # e.g. (x, y), each (B, T): every rank reads the same global batch
        batch = to_device(distributed.shard(global_batch, run.rank, run.world), run.device)  # (B / world, T)
        # Gradients are all-reduced once per optimizer step, in the last micro-batch's backward.
        sync = run.world == 1 or micro == cfg.grad_accum_steps - 1
        if run.fsdp:
            run.trained.set_requires_gradient_sync(sync)
        with nullcontext() if sync or run.fsdp else run.ddp.no_sync():
            with autocast_context(run.precision, run.device.type):
                loss = loss_fn(run.fwd, batch)  # (): mean over this rank's rows
            (loss / cfg.grad_accum_steps).backward()
        step_loss += loss.detach().float() / cfg.grad_accum_steps
        n_tokens, seq_len = _count_tokens(global_batch), _seq_len(batch)
        progress.tokens_seen += n_tokens  # all ranks' tokens: the global batch
        progress.window_tokens += n_tokens
    return step_loss, seq_len


def _window_losses(progress: _Progress) -> list[float]:
    """The window's step losses, averaged over ranks (each rank's loss is the mean over its rows)."""
    return distributed.mean_across_ranks(torch.stack([loss for _, loss, _ in progress.window])).tolist()


def _check_finite(progress: _Progress, checkpointer: CheckpointSink | None) -> None:
    """Raise :class:`NonFiniteLossError` if a step of the window had a NaN/inf loss: checked before anything is
    logged or saved, so the last good checkpoint is never overwritten by a diverged model."""
    losses = _window_losses(progress) if progress.window else []
    for (bad_step, _, _), value in zip(progress.window, losses, strict=True):
        if not math.isfinite(value):
            where = (
                f"step {progress.last_good} in {getattr(checkpointer, 'directory', '?')}"
                if progress.last_good is not None
                else "none yet"
            )
            raise NonFiniteLossError(
                f"non-finite training loss ({value}) at step {bad_step}; "
                f"stopped without saving. Last good checkpoint: {where}"
            )


def _log_row(run: _Run, progress: _Progress, lr: float, seq_len: int) -> dict[str, float]:
    """The log row of the window since the last one (its mean step loss, the last gradient norm, the lr,
    throughput), and a new window."""
    elapsed = max(time.perf_counter() - progress.t0, 1e-9)
    losses = _window_losses(progress)
    row: dict[str, float] = {}
    # With eval_train the evaluations measure train_loss; the log rows carry the step losses.
    row["step_loss" if run.cfg.eval_train else "train_loss"] = sum(losses) / len(losses)
    row.update(grad_norm=float(progress.window[-1][2]), lr=lr, tokens_seen=progress.tokens_seen)
    row.update(_telemetry(run, progress.window_tokens / elapsed, seq_len))
    progress.window, progress.window_tokens, progress.t0 = [], 0, time.perf_counter()
    return row


def _telemetry(run: _Run, tokens_per_sec: float, seq_len: int) -> dict[str, float]:
    """Throughput, MFU (where the device's peak is known) and peak memory of the last log window."""
    out = {"tokens_per_sec": tokens_per_sec, "peak_memory_mb": peak_memory_mb(run.device)}
    if run.peak is not None and run.flops_per_token is not None and seq_len:
        # tokens_per_sec counts all ranks' tokens, so the peak is all ranks' too.
        out["mfu"] = run.flops_per_token(seq_len) * tokens_per_sec / (run.peak * run.world)
    return out


def _run_eval(
    run: _Run,
    loss_fn: LossFn,
    val_data: Iterable[Batch] | None,
    train_eval_data: Iterable[Batch] | None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None,
) -> dict[str, float]:
    """One evaluation (the book's ch. 5 ``evaluate_model``): train loss (with ``eval_train``), validation loss
    and perplexity, and ``eval_fn``'s task metrics."""
    cfg = run.cfg
    row: dict[str, float] = {}
    kw = dict(max_batches=cfg.eval_batches, device=run.device, precision=run.precision)
    evaluated = run.fwd if run.world == 1 else run.model  # every rank scores the same batches: no collectives
    if cfg.eval_train:  # before val: the book's evaluate_model reads the train loader first
        row.update(train_loss=evaluate(evaluated, train_eval_data, loss_fn, **kw))
    if val_data is not None:
        val = evaluate(evaluated, val_data, loss_fn, **kw)
        row.update(val_loss=val, val_perplexity=math.exp(min(val, 50.0)))
    if eval_fn is not None:
        row.update(eval_fn(run.model))
    return row


def _snapshot(
    run: _Run, progress: _Progress, train_data: BatchSource, optimizer_state: dict[str, Any]
) -> dict[str, Any]:
    """A checkpoint's training state: everything beyond the weights that :func:`_restore` needs to continue
    exactly (optimizer moments, data position, RNG streams, counters and the history so far)."""
    return {
        "step": progress.step,
        "tokens_seen": progress.tokens_seen,
        "optimizer": optimizer_state,
        "optimizer_layout": "sharded" if run.fsdp else "replicated",
        "data": train_data.state_dict(),
        "rng": _rng_state(),
        "history": progress.history,
        "config": vars(run.cfg) | {"betas": list(run.cfg.betas)},
    }


def _save_checkpoint(
    run: _Run, progress: _Progress, checkpointer: CheckpointSink, train_data: BatchSource
) -> None:
    """Save weights and training state through ``checkpointer`` (rank 0 writes; every rank waits)."""
    if run.fsdp:  # a collective: every rank gathers its shards
        state = distributed.full_optimizer_state(run.trained, run.optimizer)
    else:
        state = run.optimizer.state_dict()
    if run.rank == 0:  # the replicas are identical (or gathered): one writer
        checkpointer.save(run.model, _snapshot(run, progress, train_data, state))
    distributed.barrier()
    progress.last_good = progress.step


def _last_logged(history: list[dict[str, float]], key: str, default: float | None) -> float | None:
    """The newest value of ``key`` in ``history``, else ``default``."""
    return next((row[key] for row in reversed(history) if key in row), default)


def train(
    model: nn.Module,
    train_data: BatchSource,
    cfg: TrainConfig,
    *,
    val_data: Iterable[Batch] | None = None,
    train_eval_data: Iterable[Batch] | None = None,
    loss_fn: LossFn = lm_loss,
    device: torch.device | str = "cpu",
    checkpointer: CheckpointSink | None = None,
    callback: MetricsCallback | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps, resuming from ``checkpointer`` if it has state.

    ``callback(step, metrics)`` gets every logged and evaluated row (stages forward these to MLflow).
    ``eval_fn(model)`` adds task metrics (e.g. accuracy) at each evaluation. ``train_eval_data`` is the
    training data as a second, independent source (another loader over the same items), read by
    ``cfg.eval_train`` so that evaluation never moves the training position.
    """
    if cfg.eval_train and train_eval_data is None:
        raise UserError("eval_train needs train_eval_data: a second loader over the training data")
    run, progress = _setup(model, train_data, cfg, torch.device(device), checkpointer)
    cfg = run.cfg
    batches = _batches_forever(train_data)
    model.train()
    run.trained.train()
    bar = tqdm(
        total=cfg.max_steps,
        initial=progress.step,
        desc="train",
        disable=run.rank != 0 or (None if cfg.progress is None else not cfg.progress),
        unit="step",
    )
    progress.t0 = start_time = time.perf_counter()
    start_tokens = progress.tokens_seen
    # A run resumed at its end (crashed after the final checkpoint) reports its last logged losses.
    train_loss = _last_logged(progress.history, "train_loss", float("nan"))
    val_loss = _last_logged(progress.history, "val_loss", None)
    while progress.step < cfg.max_steps:
        lr = learning_rate(progress.step, cfg)  # appendix D: linear warmup, then cosine decay (or constant)
        seq_len = _optimization_step(run, progress, batches, loss_fn, lr)
        bar.update(1)

        step = progress.step
        is_last = step == cfg.max_steps
        is_log = step % cfg.log_interval == 0 or is_last
        is_eval = is_eval_step(step, cfg) or is_last
        is_checkpoint = checkpointer is not None and (
            is_last or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)
        )
        if is_log or is_eval or is_checkpoint:  # a NaN stops the run before it is logged or saved
            _check_finite(progress, checkpointer)
        # Evaluation (with its callbacks) and checkpoints read the whole model: gather it only for them.
        gathered = run.fsdp and (is_eval or is_checkpoint)
        if gathered:
            distributed.copy_full_weights(run.trained, model)
        row = _log_row(run, progress, lr, seq_len) if is_log else {}
        if is_eval:
            row.update(_run_eval(run, loss_fn, val_data, train_eval_data, eval_fn))
            val_loss = row.get("val_loss", val_loss)
        train_loss = row.get("train_loss", train_loss)
        if row:
            row["step"] = step
            progress.history.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("train_loss", "val_loss")})
            if callback is not None and run.rank == 0:
                callback(step, {k: v for k, v in row.items() if k != "step"})
        if is_checkpoint:
            _save_checkpoint(run, progress, checkpointer, train_data)
        if gathered:
            distributed.release_weights(model)
    bar.close()
    if run.fsdp:  # the caller gets the trained model whole
        distributed.copy_full_weights(run.trained, model)
    total_time = max(time.perf_counter() - start_time, 1e-9)
    return TrainResult(
        step=progress.step,
        tokens_seen=progress.tokens_seen,
        train_loss=train_loss,
        val_loss=val_loss,
        tokens_per_sec=(progress.tokens_seen - start_tokens) / total_time
        if progress.tokens_seen > start_tokens
        else None,
        history=progress.history,
        precision=run.precision,
    )
