"""The COD attention predicate, in one place, used three ways.

Query element q may attend key element k iff q is not padding, both anchors lie in the same
document, and either k is real context at or before q's anchor (depth_k = 0, anchor_k ≤ anchor_q)
or k is on q's own chain at an earlier or equal depth (anchor_k = anchor_q, depth_k ≤ depth_q).
This is what vLLM's parallel-drafting runtime shows a mask slot (DESIGN §1).

1. `cod_mask`: the dense boolean [M, M] reference (tests, small inputs, the SDPA baseline).
2. `cod_block_mask` + `FlexCODAttention`: FlexAttention for CUDA (compiled, dynamic shapes).
3. `CODAttention`: the structured path that trains anywhere, CPU included. A query's visible keys
   are a contiguous range of the depth-0 stream ([document start, anchor]) plus at most d elements
   of its own chain, so attention = range attention (query chunks, custom backward, O(chunk × range)
   memory) merged by log-sum-exp with a tiny gathered chain attention. No M×M matrix is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# A draft layer calls attention(layer_idx, q [M, Hq, hd], k [M, Hkv, hd], v [M, Hkv, hd]) -> [M, Hq, hd].
Attention = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def cod_mask(anchor: Tensor, depth: Tensor, document_ids: Tensor) -> Tensor:
    """Dense COD visibility [M, M] (query rows, key columns); document_ids is over positions."""
    doc = document_ids[anchor]
    same_doc = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    real_context = (depth[None, :] == 0) & (anchor[None, :] <= anchor[:, None])
    own_chain = (anchor[None, :] == anchor[:, None]) & (depth[None, :] <= depth[:, None])
    return same_doc & (real_context | own_chain)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Reference attention with a dense boolean mask through SDPA; rows with no visible key give 0."""
    empty = ~mask.any(dim=1)
    safe = mask | torch.diag_embed(empty)  # let empty rows see themselves, then zero them
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=safe, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    ).transpose(0, 1)
    return out.masked_fill(empty[:, None, None], 0.0)


class DenseCODAttention:
    """The COD mask materialised once per forward and applied with SDPA (the baseline path)."""

    def __init__(self, anchor: Tensor, depth: Tensor, document_ids: Tensor):
        self.mask = cod_mask(anchor, depth, document_ids)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return dense_attention(q, k, v, self.mask)


def cod_block_mask(anchor: Tensor, depth: Tensor, document_ids: Tensor, block_size: int = 128):
    """FlexAttention BlockMask of the COD predicate (same rule as `cod_mask`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids[anchor]

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = (doc[q_idx] == doc[kv_idx]) & (doc[q_idx] >= 0)
        real_context = (depth[kv_idx] == 0) & (anchor[kv_idx] <= anchor[q_idx])
        own_chain = (anchor[kv_idx] == anchor[q_idx]) & (depth[kv_idx] <= depth[q_idx])
        return same_doc & (real_context | own_chain)

    m = anchor.numel()
    return create_block_mask(mask_mod, None, None, m, m, device=anchor.device, BLOCK_SIZE=block_size)


_compiled_flex = None


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


class FlexCODAttention:
    """Compiled FlexAttention with the COD BlockMask (CUDA training; CPU forward only in torch 2.13)."""

    def __init__(self, anchor: Tensor, depth: Tensor, document_ids: Tensor, compiled: bool = True):
        self.block_mask = cod_block_mask(anchor, depth, document_ids)
        if compiled:
            self.fn = _flex()
        else:
            from torch.nn.attention.flex_attention import flex_attention

            self.fn = flex_attention

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = self.fn(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Structured path: range attention (custom autograd) + chain attention, merged by log-sum-exp.


def _chunks(order: Tensor, start: Tensor, end: Tensor, budget: int, heads: int):
    """Split queries (sorted by range end) into chunks whose score tile stays under `budget`."""
    longest = int((end - start + 1).clamp(min=1).max()) if end.numel() else 1
    size = max(16, min(1024, budget // max(1, heads * longest)))
    for i in range(0, order.numel(), size):
        idx = order[i : i + size]
        s, e = start[idx], end[idx]
        live = s <= e
        if not bool(live.any()):
            continue
        yield idx, int(s[live].min()), int(e[live].max())


class _RangeAttention(torch.autograd.Function):
    """Each query i attends keys start[i]..end[i] (inclusive); returns (out, lse) with lse differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, start, end, scale, budget):
        m, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (or fp64) accumulation
        out = torch.zeros(m, hq, d, dtype=acc, device=q.device)
        lse = torch.full((m, hq), float("-inf"), dtype=acc, device=q.device)
        order = torch.argsort(end, stable=True)
        for idx, lo, hi in _chunks(order, start, end, budget, hq):
            c = idx.numel()
            qc = q[idx].to(acc).view(c, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * c, d)
            kc = k[lo : hi + 1].to(acc).transpose(0, 1)
            vc = v[lo : hi + 1].to(acc).transpose(0, 1)
            s = torch.bmm(qc, kc.transpose(1, 2)).mul_(scale).view(hkv, g, c, -1)
            pos = torch.arange(lo, hi + 1, device=q.device)
            hidden = (pos[None, :] < start[idx, None]) | (pos[None, :] > end[idx, None])
            s.masked_fill_(hidden, float("-inf"))
            l = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - torch.where(torch.isfinite(l), l, 0.0)[..., None])
            o = torch.bmm(p.view(hkv, g * c, -1), vc)
            out[idx] = o.view(hkv, g, c, d).permute(2, 0, 1, 3).reshape(c, hq, d)
            lse[idx] = l.permute(2, 0, 1).reshape(c, hq)
        ctx.save_for_backward(q, k, v, start, end, out, lse, order)
        ctx.scale, ctx.budget = scale, budget
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, start, end, out, lse, order = ctx.saved_tensors
        scale = ctx.scale
        m, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        acc = out.dtype
        dout = dout.to(acc) if dout is not None else torch.zeros_like(out)
        dlse = dlse.to(acc) if dlse is not None else torch.zeros_like(lse)
        delta = (dout * out).sum(-1) - dlse  # [m, hq]
        dq = torch.zeros(m, hq, d, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)

        def heads_first(x, c):  # [c, hq, ...] -> [hkv, g*c, ...]
            return x.view(c, hkv, g, *x.shape[2:]).permute(1, 2, 0, *range(3, x.dim() + 1)).reshape(
                hkv, g * c, *x.shape[2:]
            )

        for idx, lo, hi in _chunks(order, start, end, ctx.budget, hq):
            c = idx.numel()
            qc = heads_first(q[idx].to(acc), c)
            kc = k[lo : hi + 1].to(acc).transpose(0, 1)
            vc = v[lo : hi + 1].to(acc).transpose(0, 1)
            s = torch.bmm(qc, kc.transpose(1, 2)).mul_(scale)
            l = heads_first(lse[idx], c)
            p = torch.exp(s - torch.where(torch.isfinite(l), l, 0.0)[..., None])
            pos = torch.arange(lo, hi + 1, device=q.device)
            hidden = (pos[None, :] < start[idx, None]) | (pos[None, :] > end[idx, None])
            p.view(hkv, g, c, -1).masked_fill_(hidden, 0.0)
            doc = heads_first(dout[idx], c)
            dv[lo : hi + 1] += torch.bmm(p.transpose(1, 2), doc).transpose(0, 1)
            dp = torch.bmm(doc, vc.transpose(1, 2))
            ds = p.mul_(dp.sub_(heads_first(delta[idx], c)[..., None])).mul_(scale)
            dq[idx] = torch.bmm(ds, kc).view(hkv, g, c, d).permute(2, 0, 1, 3).reshape(c, hq, d)
            dk[lo : hi + 1] += torch.bmm(ds.transpose(1, 2), qc).transpose(0, 1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def range_attention(
    q: Tensor, k: Tensor, v: Tensor, start: Tensor, end: Tensor, scale: float | None = None,
    budget: int = 1 << 22,
) -> tuple[Tensor, Tensor]:
    """Attention where query i sees keys start[i]..end[i]; returns (out [M, Hq, hd], lse [M, Hq] fp32).

    An empty range (start > end) gives out 0 and lse −inf. Memory: one [Hq, chunk, range] tile at a
    time (`budget` elements), in forward and backward.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RangeAttention.apply(q, k, v, start, end, scale, budget)


def _chain_part(q: Tensor, k: Tensor, v: Tensor, chain: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    r, hq, d = q.shape
    hkv = k.shape[1]
    valid = chain >= 0
    idx = chain.clamp(min=0)
    acc = torch.promote_types(q.dtype, torch.float32)
    kc, vc = k[idx].to(acc), v[idx].to(acc)  # [r, c, hkv, d]
    s = torch.einsum("rhgd,rchd->rhgc", q.to(acc).view(r, hkv, hq // hkv, d), kc) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("rhgc,rchd->rhgd", p, vc).reshape(r, hq, d)
    return out, lse.reshape(r, hq)


def chain_attention(q: Tensor, k: Tensor, v: Tensor, chain: Tensor, scale: float | None = None):
    """Query i attends the key elements listed in chain[i] (−1 = none); returns (out, lse).

    Recomputed in backward (activation checkpoint) so the gathered keys are never kept.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return checkpoint(_chain_part, q, k, v, chain, scale, use_reentrant=False)
    return _chain_part(q, k, v, chain, scale)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Combine two attentions over disjoint key sets by their log-sum-exps (both parts non-empty-safe)."""
    lse = torch.logaddexp(lse_a, lse_b)
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    w_a = torch.exp(lse_a - lse)[..., None]
    w_b = torch.exp(lse_b - lse)[..., None]
    return w_a * out_a.to(w_a.dtype) + w_b * out_b.to(w_a.dtype)


class CODAttention:
    """Structured COD attention for one forward (any device; the CPU training path).

    key_start/key_end: each query's visible range of the depth-0 stream (context keys).
    chain: [M, C] indices into this forward's own elements of the query's chain keys at depths
    1..d (−1 = none). context: per-layer (k, v) of the depth-0 stream when it is not part of this
    forward (sequence partitioning); otherwise the first `num_context` elements are the stream.
    record: a dict that receives each layer's (k, v) (to build such a context).
    """

    def __init__(
        self, key_start: Tensor, key_end: Tensor, chain: Tensor, *, num_context: int | None = None,
        context: list[tuple[Tensor, Tensor]] | None = None, record: dict | None = None,
    ):
        self.key_start, self.key_end = key_start, key_end
        self.rows = torch.nonzero((chain >= 0).any(dim=1)).squeeze(1)
        self.chain = chain[self.rows]
        self.num_context, self.context, self.record = num_context, context, record

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.record is not None:
            self.record[layer] = (k, v)
        if self.context is not None:
            k_ctx, v_ctx = self.context[layer]
        else:
            k_ctx, v_ctx = k[: self.num_context], v[: self.num_context]
        out, lse = range_attention(q, k_ctx, v_ctx, self.key_start, self.key_end)
        if self.rows.numel() == 0:
            return out
        out_b, lse_b = chain_attention(q[self.rows], k, v, self.chain)
        merged = merge_attention(out[self.rows], lse[self.rows], out_b, lse_b).to(out.dtype)
        return out.index_copy(0, self.rows, merged)
