"""Data parallelism as a layer around the plain trainer: process group, DDP or FSDP2, summed gradients.

The training step divides every forward's KL sum by ONE count (the supervised COD elements of the
whole optimizer step, all ranks; docs/conventions.md, "Loss"), so gradients must be *summed* over
ranks, not averaged: under DDP a communication hook does exactly that; under FSDP2 (`fully_shard`,
``train.parallel: fsdp``) a divide factor of 1 with sum-only reduce-scatters. FSDP2 shards the draft's
weights, gradients and AdamW state over the ranks; `full_draft` and `full_optimizer_state` gather them
whole on rank 0 in the layout a DDP run has, so checkpoints and exports are one format
(docs/training.md, "Data parallelism"). One process is the same code with `Dist.active == False`
(every helper here is then a no-op or the plain object).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peagle.config.training import ConfigError
from peagle.model.draft import PEagleDraft
from peagle.model.step import PEagleTrainer

__all__ = ["Dist", "init_distributed", "all_reduce", "gather_objects", "barrier", "wrap", "sync_unless",
           "is_sharded", "local_shard", "full_draft", "full_optimizer_state", "load_optimizer_state"]


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


def wrap(trainer: PEagleTrainer, d: Dist, parallel: str = "ddp", bf16_params: bool = False) -> nn.Module:
    """``trainer`` itself in one process; under W > 1 DDP around it, or (``parallel == "fsdp"``) the trainer
    sharded in place by FSDP2. Either way gradients are summed over ranks.

    DDP: find_unused_parameters, since a partitioned step's last unit (the depth-0 stream) does not touch
    lm_head / mask_hidden; their no_sync-accumulated gradients are still all-reduced then. Buffers never
    change, so the per-forward buffer broadcast is skipped. ``bf16_params``: FSDP2 only (see `_shard`).
    """
    if not d.active:
        return trainer
    if parallel == "fsdp":
        return _shard(trainer, d, bf16_params)
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(trainer, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                find_unused_parameters=True, broadcast_buffers=False)
    model.register_comm_hook(None, _sum_hook)
    return model


def _shard(trainer: PEagleTrainer, d: Dist, bf16_params: bool) -> nn.Module:
    """FSDP2 over all ranks: one group per draft decoder layer, and the root group on the trainer — the
    embeddings, fc, norms, mask_hidden and lm_head, which its forward reads around the layers (the loss
    takes ``lm_head.weight`` directly), so the root must be the module whose forward is called.

    Gradients are summed: divide factor 1 with sum-only collectives (a plain SUM reduce-scatter, which
    gloo has; a factor alone would ask for NCCL's PREMUL_SUM). A parameter a rank did not use in a step
    is reduce-scattered as zeros, so every rank reduces the same tensors (DDP's find_unused_parameters).
    ``bf16_params`` (CUDA, train.dtype bf16): the norm for FSDP2, bf16 compute copies of the weights with
    fp32 gradient reduction, the sharded master weights and AdamW state staying fp32.

    Every all-gather and reduce-scatter is a collective, so all ranks must issue the same ones in the
    same order. A flat step does (one forward and backward per micro-batch through every layer), and
    its layers are released after each forward (gathered again in backward). Sequence partitions run a
    data-dependent number of forwards per micro-batch, so there the layers stay gathered from their
    first forward of the step to its last backward (`sync_unless`), which every rank runs through every
    layer (the depth-0 stream), in the same order.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params \
        else MixedPrecisionPolicy()
    for layer in trainer.draft.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=trainer.sequence_partitions == 1)
    fully_shard(trainer, mesh=mesh, mp_policy=mp)
    for module in trainer.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
            module.set_reduce_scatter_unused_params(True, recurse=False)
    return trainer


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (what `wrap` returned) is FSDP2-sharded."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of ``t``: its shard of an FSDP2 parameter or gradient (a DTensor), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def sync_unless(model: nn.Module, skip: bool) -> Iterator[None]:
    """Accumulate gradients locally when ``skip`` (DDP's ``no_sync``; FSDP2's gradient sync off, the
    weights kept gathered for the next forward), else reduce them over ranks in this block's backward
    (FSDP2: and release the gathered weights, which the optimizer step is about to change)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(not skip)
        model.set_reshard_after_backward(not skip)
        yield
    elif skip and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# the whole draft and AdamW state, gathered (checkpoints, the export, acceptance during training)


def _full_options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_draft(model: nn.Module, draft: PEagleDraft, d: Dist) -> PEagleDraft | None:
    """The whole draft on rank 0, None on the others: ``draft`` itself, or under FSDP2 a plain draft
    holding every weight gathered to rank 0's CPU (a collective: every rank must call it)."""
    if not is_sharded(model):
        return draft if d.main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(draft, options=_full_options(cpu_offload=True))
    return PEagleDraft.from_state_dict(draft.config, state, source="the gathered FSDP draft") if d.main else None


def _param_names(draft: PEagleDraft, optimizer: torch.optim.Optimizer) -> list[str]:
    """Each optimizer parameter's name, in the optimizer's order: index i is its id in ``state_dict()``."""
    names = {id(p): n for n, p in draft.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _rekey(osd: dict[str, Any], key: Callable[[Any], Any]) -> dict[str, Any]:
    """An optimizer state dict with every parameter key (state and param_groups) mapped by ``key``."""
    return {"state": {key(k): v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [key(p) for p in g["params"]]} for g in osd["param_groups"]]}


def full_optimizer_state(model: nn.Module, draft: PEagleDraft, optimizer: torch.optim.Optimizer, d: Dist
                         ) -> dict[str, Any] | None:
    """The AdamW state as ``optimizer.state_dict()`` lays it out (parameters by index), on rank 0 (None on
    the others); under FSDP2 gathered whole to rank 0's CPU (a collective). One layout for both modes,
    so a checkpoint resumes under either. Before the first update there are no moments to gather (and
    torch's gather would make some with a zero step): the state dict as it is."""
    if not is_sharded(model) or not optimizer.state:
        return optimizer.state_dict() if d.main else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(draft, optimizer, options=_full_options(cpu_offload=True))
    if not d.main:
        return None
    index = {name: i for i, name in enumerate(_param_names(draft, optimizer))}
    return _rekey(by_name, index.__getitem__)


def load_optimizer_state(model: nn.Module, draft: PEagleDraft, optimizer: torch.optim.Optimizer, d: Dist,
                         read: Callable[[], dict[str, Any]]) -> None:
    """Load the `full_optimizer_state` that ``read`` returns: on every rank under DDP; under FSDP2 rank 0
    reads it and every rank receives its shards (a collective). A state saved before the first update
    holds no moments: the fresh optimizer is that state (its hyperparameters come from the config)."""
    if not is_sharded(model):
        optimizer.load_state_dict(read())
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    full = read() if d.main else None
    if not gather_objects(bool(full is not None and full["state"]), d)[0]:
        return
    names = _param_names(draft, optimizer)
    by_name = _rekey(full, names.__getitem__) if full is not None else {}
    # strict=False: a parameter a DDP run never stepped (mask_hidden when K = 1) has no saved moments; it keeps
    # the zero ones torch creates, which its zero gradients leave at zero (no update, as under DDP)
    set_optimizer_state_dict(draft, optimizer, by_name,
                             options=_full_options(broadcast_from_rank0=True, strict=False))
