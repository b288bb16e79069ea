"""AdamW and the learning-rate schedule (linear warmup, cosine to a floor), and their resume rule.

The schedule is a pure function of the step, so a resumed run takes exactly the steps of one that
never stopped; `apply_optim_config` makes an accepted config change (``--accept-change optim.lr``)
take effect from the resumed step instead of being silently overridden by the checkpoint's state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peagle.config.training import OptimConfig

__all__ = ["lr_factor", "build_optimizer", "apply_optim_config", "grad_norm"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, cosine to the floor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, not the mask_hidden vector)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name != "mask_hidden" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module, o: OptimConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s trainable parameters and its schedule over ``total_steps``."""
    optimizer = torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                  eps=o.eps, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, o.warmup_steps, o.min_lr_ratio))
    return optimizer, scheduler


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                       o: OptimConfig, step: int, total: int) -> float:
    """After a resume: this config's AdamW settings and lr schedule from ``step`` on; returns the lr used next.

    A checkpoint's optimizer and scheduler states carry the old run's lr, betas, eps and weight
    decay; without this they would silently win over the config. Unchanged values give exactly the
    numbers LambdaLR would have produced (``base_lr * factor(step)``), so exact resume is kept.
    """
    factor = lr_factor(step, total, o.warmup_steps, o.min_lr_ratio)
    for i, g in enumerate(optimizer.param_groups):
        g["initial_lr"] = o.lr
        g["betas"] = tuple(o.betas)
        g["eps"] = o.eps
        g["weight_decay"] = o.weight_decay if i == 0 else 0.0
        g["lr"] = o.lr * factor
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return float(optimizer.param_groups[0]["lr"])


def grad_norm(params: list[Tensor], clip: float | None) -> float:
    """Global gradient norm (clipping to ``clip`` when set). FSDP2 gradients are shards (DTensors): their
    norm is reduced over the ranks, and every rank clips its shards by that one norm."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip, total)
    return float(total)
