"""Forward KL(target ‖ draft) over the draft vocabulary, chunked so [E, Vd] logits never exist at once.

For E supervised elements with draft hidden h (post final norm), draft lm_head W [Vd, H] and target
log-probs log p (target logits restricted to the draft vocab, renormalised):

    z = h @ Wᵀ,  log q = log_softmax(z),  KL_e = Σ_v p_v (log p_v − log q_v)
                                          = Σ_v p_v log p_v − p · z + logsumexp(z) Σ_v p_v
    ∂KL_e/∂z = softmax(z) − p            (because Σ_v p_v = 1)
    ∂/∂h = (q − p) @ W,   ∂/∂W = (q − p)ᵀ @ h

`_ChunkedKL` loops over chunks of elements sorted by target row in forward (sums and metrics only;
the ~K elements that share a target position share one target softmax) and recomputes each
chunk's logits in backward, so extra memory is O(chunk × Vd) instead of O(E × Vd). All maths in fp32;
gradients come back in the inputs' dtypes. The loss is a SUM: the caller divides by the global count
of supervised elements, or weights each depth by ``depth_weight`` (docs/conventions.md, "Loss").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TargetHead(nn.Module):
    """Frozen target final RMSNorm + the target lm_head rows of the draft vocab (buffers, no params).

    Computes target logits on the fly from target final hidden states (offline caches store hidden
    [E, Ht] instead of logits [E, V]). Same dtype behaviour as the HF target: the norm is computed in
    fp32 and cast back to the input dtype, the matmul runs in the weights' dtype; returned as fp32.
    """

    def __init__(self, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.ndim != 2 or norm_weight.shape != (weight.shape[1],):
            raise ValueError(
                f"norm_weight {tuple(norm_weight.shape)} must be [Ht] for lm_head rows {tuple(weight.shape)}"
            )
        self.norm_weight = nn.Buffer(norm_weight.detach().clone())
        self.weight = nn.Buffer(weight.detach().clone())
        self.eps = float(eps)

    @classmethod
    def from_weights(
        cls,
        norm_weight: torch.Tensor,
        eps: float,
        lm_head_weight: torch.Tensor,
        t2d: torch.Tensor | None = None,
    ) -> TargetHead:
        """From the target's final-norm weight [Ht], eps and full lm_head [V, Ht]; keeps rows where t2d."""
        rows = lm_head_weight if t2d is None else lm_head_weight[t2d.to(lm_head_weight.device)]
        return cls(norm_weight, eps, rows)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [E, Ht] (target final hidden, before its norm) → fp32 logits [E, Vd]."""
        dtype = hidden.dtype
        x = hidden.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        x = self.norm_weight * x
        return F.linear(x.to(self.weight.dtype), self.weight).float()


@dataclass
class LossSums:
    """Sums over the given elements (divide by a global count outside).

    kl_sum: scalar fp32, differentiable. kl_per_depth / correct_per_depth / count_per_depth: [K] fp32,
    detached; correct = draft argmax == target argmax (top-1 agreement over the draft vocab).
    """

    kl_sum: torch.Tensor
    kl_per_depth: torch.Tensor
    correct_per_depth: torch.Tensor
    count_per_depth: torch.Tensor


def _target_rows(
    start: int,
    end: int,
    target_logits: torch.Tensor | None,
    target_hidden: torch.Tensor | None,
    target_head: nn.Module | None,
    target_index: torch.Tensor | None,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct target rows of elements [start, end), no grad: log p [U, Vd] over the draft vocab,
    and each element's row in them [C].

    Elements come sorted by target row (`kl_loss` sorts them), so the ~K elements that share a target
    position share one softmax (and, from hidden states, one target-head matmul)."""
    source = target_logits if target_logits is not None else target_hidden
    if target_index is None:  # one target row per element
        rows, inverse = slice(start, end), torch.arange(end - start, device=source.device)
    else:
        rows, inverse = torch.unique_consecutive(target_index[start:end], return_inverse=True)
    with torch.no_grad():
        logits = source[rows] if target_logits is not None else target_head(source[rows])
        return torch.log_softmax(logits.to(acc), dim=-1), inverse


# The backward needs q − p of every chunk. The forward keeps it for the first chunks up to this many
# bytes (no recompute of their logits, softmaxes and target rows in backward: ~1/4 of the loss's
# work); the rest is recomputed, so the extra memory stays bounded whatever E × Vd is.
_KEEP_BYTES = 64 << 20


def _forward_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    depth: torch.Tensor,
    num_depths: int,
    target: tuple,
    chunk_size: int,
    keep: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-depth KL sums, top-1 agreement and counts, one chunk of elements at a time; appends q − p of
    the first chunks (within `_KEEP_BYTES`) to ``keep`` for the backward.

    KL_e = Σ p log p − Σ_v p_v z_v + lse(z)·Σ p  (= Σ_v p_v (log p_v − log q_v)): the target terms are
    per distinct target row, the element terms are one dot product and one log-sum-exp per element."""
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 maths (fp64 when given fp64)
    w32 = weight.to(acc)
    kl_per_depth = torch.zeros(num_depths, dtype=acc, device=hidden.device)
    correct = torch.zeros_like(kl_per_depth)
    count = torch.zeros_like(kl_per_depth)
    kept_bytes = 0
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        z = hidden[start:end].to(acc) @ w32.T
        log_p, inverse = _target_rows(start, end, *target, acc)
        p_rows = log_p.exp()
        neg_entropy = torch.einsum("uv,uv->u", p_rows, log_p.clamp(min=torch.finfo(acc).min))  # 0·log 0 = 0
        p = p_rows.index_select(0, inverse)
        p_dot_z = torch.einsum("cv,cv->c", p, z)
        d = depth[start:end]
        correct.index_add_(0, d, (z.argmax(-1) == log_p.argmax(-1)[inverse]).to(acc))
        # logsumexp by hand, in z's buffer: the exponentials it sums are the unnormalised q that the
        # backward needs (torch.logsumexp is ~2× slower and would leave them to be recomputed)
        z_max = z.amax(-1, keepdim=True)
        e = z.sub_(z_max).exp_()
        e_sum = e.sum(-1, keepdim=True)
        lse = (z_max + e_sum.log()).squeeze(1)
        kl = neg_entropy[inverse] - p_dot_z + lse * p_rows.sum(-1)[inverse]
        kl_per_depth.index_add_(0, d, kl)
        count.index_add_(0, d, torch.ones_like(kl))
        size = e.numel() * e.element_size()
        if keep is not None and len(keep) == start // chunk_size and kept_bytes + size <= _KEEP_BYTES:
            keep.append(e.div_(e_sum).sub_(p))  # q − p, in z's buffer (a prefix of the chunks)
            kept_bytes += size
    return kl_per_depth, correct, count


def _backward_chunks(
    grad_sum: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: tuple,
    chunk_size: int,
    need_h: bool,
    need_w: bool,
    kept: list[torch.Tensor] = (),
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dz = g·w_e·(q − p) (kept by the forward, else recomputed; w_e = 1 without ``row_weight`` [E]);
    dh = dz @ W, dW += dzᵀ @ h."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    w32 = weight.to(acc)
    g_all = grad_sum.to(acc) if row_weight is None else grad_sum.to(acc) * row_weight.to(acc)[:, None]
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w32 = torch.zeros_like(w32) if need_w else None
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h32 = hidden[start:end].to(acc)
        g = g_all if row_weight is None else g_all[start:end]
        if start // chunk_size < len(kept):
            dz = kept[start // chunk_size].mul_(g)
        else:
            dz = torch.softmax(h32 @ w32.T, dim=-1)
            log_p, inverse = _target_rows(start, end, *target, acc)
            dz.sub_(log_p.exp_().index_select(0, inverse)).mul_(g)  # in place: one [C, Vd] buffer
        if need_h:
            grad_h[start:end] = (dz @ w32).to(hidden.dtype)
        if need_w:
            grad_w32.addmm_(dz.T, h32)
    return grad_h, None if grad_w32 is None else grad_w32.to(weight.dtype)


class _ChunkedKL(torch.autograd.Function):
    """Chunked forward KL (see the module docstring). Outputs (kl_sum, kl_per_depth, correct, count);
    only kl_sum (Σ_d depth_weight_d · kl_d, the weights 1 when not given) is differentiable. Saves the
    inputs and q − p of the first chunks (`_KEEP_BYTES`); autocast is disabled inside (fp32 maths)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        depth: torch.Tensor,
        num_depths: int,
        target_logits: torch.Tensor | None,
        target_hidden: torch.Tensor | None,
        target_head: nn.Module | None,
        target_index: torch.Tensor | None,
        chunk_size: int,
        depth_weight: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        target = (target_logits, target_hidden, target_head, target_index)
        with torch.autocast(hidden.device.type, enabled=False):
            keep: list[torch.Tensor] | None = [] if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None
            sums = _forward_chunks(hidden, weight, depth, num_depths, target, chunk_size, keep)
        kl_per_depth, correct, count = sums
        if depth_weight is None:
            kl_sum, row_weight = kl_per_depth.sum(), None
        else:
            w = depth_weight.to(kl_per_depth)
            kl_sum, row_weight = (kl_per_depth * w).sum(), w[depth]
        ctx.save_for_backward(hidden, weight, target_logits, target_hidden, target_index, row_weight)
        ctx.target_head = target_head
        ctx.chunk_size = chunk_size
        ctx.kept = keep or []
        ctx.mark_non_differentiable(kl_per_depth, correct, count)
        return kl_sum, kl_per_depth, correct, count

    @staticmethod
    def backward(ctx: Any, grad_sum: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, target_logits, target_hidden, target_index, row_weight = ctx.saved_tensors
        target = (target_logits, target_hidden, ctx.target_head, target_index)
        with torch.autocast(hidden.device.type, enabled=False):
            need_h, need_w = ctx.needs_input_grad[:2]
            grads = _backward_chunks(grad_sum, hidden, weight, target, ctx.chunk_size, need_h, need_w, ctx.kept,
                                     row_weight)
        ctx.kept = []
        grad_h, grad_w = grads
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def kl_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    depth: torch.Tensor,
    num_depths: int,
    *,
    target_logits: torch.Tensor | None = None,
    target_hidden: torch.Tensor | None = None,
    target_head: nn.Module | None = None,
    target_index: torch.Tensor | None = None,
    chunk_size: int = 2048,
    depth_weight: torch.Tensor | None = None,
) -> LossSums:
    """Summed forward KL(target ‖ draft) over the draft vocab, plus per-depth metrics.

    hidden [E, H]: draft hidden after the final norm, at supervised elements only (the caller gathers).
    lm_head_weight [Vd, H]: may be frozen (requires_grad False → no weight gradient is computed).
    depth [E] in [0, num_depths). Target: exactly one of target_logits [E, Vd] (already restricted to
    the draft vocab) or target_hidden [E, Ht] with target_head (a `TargetHead`); with target_index [E]
    the target tensors are indexed by it chunk by chunk (no [E, Vd] gather), the elements sorted by it so
    that each distinct target row is normalised once. The target never gets a gradient. Extra memory
    is O(chunk_size × Vd), plus an fp32 copy of W when W is not fp32. ``depth_weight`` [K]: kl_sum is
    Σ_d depth_weight_d · (KL summed over depth d) instead of the plain sum (the metrics stay unweighted).
    """
    if (target_logits is None) == (target_hidden is None):
        raise ValueError("give exactly one of target_logits or target_hidden (+ target_head)")
    if target_hidden is not None and target_head is None:
        raise ValueError("target_hidden needs target_head")
    if hidden.ndim != 2 or lm_head_weight.ndim != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and lm_head_weight {tuple(lm_head_weight.shape)} mismatch"
        )
    num_elements = hidden.shape[0]
    target = target_logits if target_logits is not None else target_hidden
    target_rows = num_elements if target_index is None else target_index.shape[0]
    if depth.shape != (num_elements,) or target_rows != num_elements:
        raise ValueError(
            f"depth {tuple(depth.shape)} and target {tuple(target.shape)} must have E={num_elements} rows"
        )
    if target_logits is not None and target_logits.shape[1] != lm_head_weight.shape[0]:
        raise ValueError(
            f"target_logits has {target_logits.shape[1]} columns, "
            f"the draft vocab has {lm_head_weight.shape[0]}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if depth_weight is not None and tuple(depth_weight.shape) != (num_depths,):
        raise ValueError(f"depth_weight must have shape ({num_depths},), got {tuple(depth_weight.shape)}")
    depth = depth.long()
    if target_index is not None:  # sorted by target row: a chunk's elements share their target rows
        target_index = target_index.long()
        order = torch.argsort(target_index, stable=True)
        hidden, depth, target_index = hidden.index_select(0, order), depth[order], target_index[order]
    kl_sum, kl_per_depth, correct, count = _ChunkedKL.apply(
        hidden,
        lm_head_weight,
        depth,
        num_depths,
        None if target_logits is None else target_logits.detach(),
        None if target_hidden is None else target_hidden.detach(),
        target_head,
        target_index,
        chunk_size,
        None if depth_weight is None else depth_weight.detach(),
    )
    return LossSums(kl_sum, kl_per_depth, correct, count)


def loss_divisor(count_per_depth: torch.Tensor, normalization: str) -> float | tuple[float, ...]:
    """The divisor of one optimizer step's KL sum, from its global supervised counts per depth [K].

    "elements": one number, the count of every depth (each supervised element weighs the same, so depth
    0, the most numerous after COD, carries most of the loss). "depths": K numbers, K · count_d (each
    depth's mean KL weighs 1/K: a deep element, rarer after COD, weighs more). Counts of 0 count as 1.
    Plain floats, not tensors: FSDP's mixed precision would cast a tensor argument of the forward to bf16.
    """
    if normalization == "elements":
        return float(max(float(count_per_depth.sum()), 1.0))
    if normalization == "depths":
        k = count_per_depth.numel()
        return tuple(k * max(float(c), 1.0) for c in count_per_depth.tolist())
    raise ValueError(f"loss normalization must be 'elements' or 'depths', got {normalization!r}")


__all__ = ["LossSums", "TargetHead", "kl_loss", "loss_divisor"]
