"""Data parallelism as a layer around the plain trainer: process group, DDP wrapping, the SUM hook.

The training step divides every forward's KL sum by ONE count (the supervised COD elements of the
whole optimizer step, all ranks; docs/conventions.md, "Loss"), so gradients must be *summed* over
ranks, not averaged: `wrap` registers a communication hook that does exactly that. One process is
the same code with `Dist.active == False` (every helper here is then a no-op).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peagle.config.training import ConfigError

__all__ = ["Dist", "init_distributed", "all_reduce", "gather_objects", "barrier", "wrap", "sync_unless"]


@dataclass
class Dist:
    """This process's place in the job (from torchrun's environment) and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        """Tear down the process group if this process created it."""
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_pref: str) -> Dist:
    """Read RANK/WORLD_SIZE/LOCAL_RANK, pick the device, and start a gloo/nccl group when W > 1.

    ``device_pref``: "auto" (CUDA when available), "cuda" or "cpu"; "cuda" on a machine without one is
    a :class:`ConfigError`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        here = True
    return Dist(rank, world, local_rank, device, here)


def all_reduce(t: Tensor, d: Dist) -> Tensor:
    """Sum ``t`` over ranks in place (identity in one process); returns ``t``."""
    if d.active:
        dist.all_reduce(t)
    return t


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj`` (rank order) on every rank; ``[obj]`` in one process."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def _sum_hook(state, bucket):  # noqa: ANN001, ANN202 - DDP inspects the annotations: leave none
    """DDP communication hook: SUM gradients over ranks (the loss is already globally normalised)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(module: nn.Module, d: Dist) -> nn.Module:
    """``module`` itself in one process; under W > 1 a DDP wrapper whose gradients are summed.

    find_unused_parameters: a partitioned step's last unit (the depth-0 stream) does not touch lm_head /
    mask_hidden; their no_sync-accumulated gradients are still all-reduced then. Buffers never change,
    so the per-forward buffer broadcast is skipped.
    """
    if not d.active:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                find_unused_parameters=True, broadcast_buffers=False)
    model.register_comm_hook(None, _sum_hook)
    return model


@contextlib.contextmanager
def sync_unless(model: nn.Module, skip: bool) -> Iterator[None]:
    """``model.no_sync()`` when ``skip`` and ``model`` is DDP (gradients accumulate locally), else nothing."""
    if skip and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield
