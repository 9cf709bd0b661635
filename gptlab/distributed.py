"""Data-parallel training across processes (``torchrun``): the process group, ranks, and batch sharding.

PyTorch's DistributedDataParallel (Li et al., "PyTorch Distributed", VLDB 2020): every rank holds the whole model,
reads the same global batch, trains on its own slice of the rows, and gradients are averaged across ranks before
each optimizer step, so N ranks with a global batch B take the step one process takes on B. ``torchrun`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`init_from_env` joins the group (gloo on
CPU, NCCL on CUDA). Without those variables everything here is the single-process identity.

Fully sharded data parallel (FSDP2) trains a sharded copy of the model with the same data split and the same
gradient average, so DDP and FSDP take the same steps; see :func:`shard_model`.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist

from gptlab.errors import UserError


def init_from_env(device_type: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes (once); False when this is a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that logs, writes files and talks to MLflow."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all ranks (identity for one process)."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world_size()


def shard(batch: Any, index: int, count: int) -> Any:
    """Rank ``index`` of ``count``'s contiguous share of a global batch: rows ``[index * B/count, (index + 1) *
    B/count)`` of every tensor in it (a tensor, or tuples, lists and dicts of tensors)."""
    if count == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % count:
            raise UserError(
                f"a batch of {batch.shape[0]} rows does not split evenly over {count} processes: use a batch_size "
                "that is a multiple of the process count, and drop_last: true where the data's size is not one"
            )
        per = batch.shape[0] // count
        return batch[index * per : (index + 1) * per]
    if isinstance(batch, tuple | list):
        return type(batch)(shard(b, index, count) for b in batch)
    if isinstance(batch, dict):
        return {k: shard(v, index, count) for k, v in batch.items()}
    return batch


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """A fully sharded copy of ``model`` for training (FSDP2, ``torch.distributed.fsdp.fully_shard``; Zhao et al.,
    "PyTorch FSDP", VLDB 2023): each transformer block is one all-gather unit, the embeddings, final norm and
    head are the root's; every rank keeps 1/world of the parameters, gradients and optimizer state.

    ``model`` keeps its weights; :func:`gptlab.train.train` empties them (:func:`release_weights`) while the copy
    trains and gathers them back (:func:`copy_full_weights`) for evaluation, sampling and saving, so those read an
    ordinary module."""
    from torch.distributed.fsdp import fully_shard

    # The copy shares the weights' storage until fully_shard has cut its shards from them: a whole model's
    # memory, not two, at the start.
    weights = [p.data for p in model.parameters()]
    release_weights(model)
    sharded = copy.deepcopy(model)
    for params in (model.parameters(), sharded.parameters()):
        for p, data in zip(params, weights, strict=True):
            p.data = data
    for block in sharded.blocks:
        fully_shard(block)
    fully_shard(sharded)
    return sharded


def release_weights(model: torch.nn.Module) -> None:
    """Free ``model``'s parameter storage (the Parameter objects, and so weight tying, stay) until
    :func:`copy_full_weights` fills them again: FSDP's memory saving would be lost to a whole idle replica."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def copy_full_weights(sharded: torch.nn.Module, into: torch.nn.Module) -> None:
    """All-gather ``sharded``'s parameters into ``into`` (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    for name, p in into.named_parameters():  # a tied parameter is listed once and filled once
        p.data = full[name].to(p.dtype)


def full_optimizer_state(sharded: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name, gathered on rank 0 (``torch.distributed.checkpoint``'s
    state-dict API; empty on the other ranks). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        sharded, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(
    sharded: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Shard a state from :func:`full_optimizer_state` (read by every rank) into ``optimizer``; the world size
    may differ from the run that saved it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(sharded, optimizer, state, options=StateDictOptions(full_state_dict=True))
