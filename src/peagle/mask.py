"""The COD attention predicate, in one place, used three ways.

Query element q may attend key element k iff q is not padding, both anchors lie in the same
document, and either k is real context at or before q's anchor (depth_k = 0, anchor_k ≤ anchor_q)
or k is on q's own chain at an earlier or equal depth (anchor_k = anchor_q, depth_k ≤ depth_q).
This is what vLLM's parallel-drafting runtime shows a mask slot (docs/conventions.md, "Flat input and mask").

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


# A chunk of queries shares one [c, R] score tile over the union of their key ranges, so a tile spends
# c·R products on Σ range pairs the queries need. The greedy split keeps every tile at least half useful,
# unless the tile is under _SMALL_TILE pairs (then one more op sequence would cost more than the waste).
# Short documents (many ranges far apart) get small tiles, one long document large ones: the old fixed
# chunk of up to 1024 queries spent ~14 products per useful one on the demo's 4 rows of short chats.
_SMALL_TILE = 1 << 14
_MAX_CHUNK = 1024


def _chunks(start: Tensor, end: Tensor, budget: int, heads: int) -> list[tuple[int, int, int, int, int, int]]:
    """Split queries (already sorted by range end) into chunks whose score tiles are mostly useful.

    Each chunk is (i, j, lo, hi, full_lo, full_hi): queries i..j-1 see keys within [lo, hi]; keys in
    [full_lo, full_hi] are visible to every query of the chunk, so only the edges need masking. A tile
    holds at most `budget` scores (heads × c × R), at least half of them needed by their query (or it is
    smaller than `_SMALL_TILE` pairs). Empty ranges (start > end) are skipped.
    """
    out = []
    starts, ends = start.tolist(), end.tolist()
    cap = max(1, budget // max(1, heads))
    i, n = 0, len(ends)
    while i < n:
        if starts[i] > ends[i]:
            i += 1
            continue
        lo, hi, full_lo, full_hi, useful, j = starts[i], ends[i], starts[i], ends[i], ends[i] - starts[i] + 1, i + 1
        while j < n and j - i < _MAX_CHUNK:
            s_j, e_j = starts[j], ends[j]
            if s_j > e_j:  # an empty range inside the chunk costs nothing (its row is masked)
                j += 1
                continue
            new_lo, new_useful = min(lo, s_j), useful + e_j - s_j + 1
            area = (j + 1 - i) * (e_j - new_lo + 1)
            if area > cap or (area > _SMALL_TILE and area > 2 * new_useful):
                break
            lo, hi, useful, j = new_lo, e_j, new_useful, j + 1
            full_lo, full_hi = max(full_lo, s_j), min(full_hi, e_j)
        out.append((i, j, lo, hi, full_lo, full_hi))
        i = j
    return out


class RangePlan:
    """The query order and chunks of one set of ranges, computed once and reused by every layer (and by
    the backward passes): the ranges of a COD batch are the same in all layers."""

    def __init__(self, start: Tensor, end: Tensor, heads: int, budget: int = 1 << 20):
        self.order = torch.argsort(end, stable=True)
        self.start_s, self.end_s = start[self.order], end[self.order]
        self.chunks = _chunks(self.start_s, self.end_s, budget, heads)
        m = end.numel()
        covered = torch.zeros(m, dtype=torch.bool, device=end.device)
        for i, j, *_ in self.chunks:
            covered[i:j] = True
        self.dead = (self.start_s > self.end_s) | ~covered  # empty ranges (padding queries): out 0, lse -inf
        self.inv = torch.empty_like(self.order)
        self.inv[self.order] = torch.arange(m, device=end.device)
        self._masks: list[Tensor] | None = None

    def masks(self) -> list[Tensor]:
        """Per chunk, the [c, R] boolean of visible keys (a dead query sees its first column, then gives 0)."""
        if self._masks is None:
            self._masks = []
            for i, j, lo, hi, _, _ in self.chunks:
                pos = torch.arange(lo, hi + 1, device=self.end_s.device)
                st, en = self.start_s[i:j, None], self.end_s[i:j, None]
                mask = (pos[None, :] >= st) & (pos[None, :] <= en)
                mask[:, 0] |= ~mask.any(dim=1)
                self._masks.append(mask)
        return self._masks


def _edge_mask_(x: Tensor, start: Tensor, end: Tensor, lo: int, full_lo: int, full_hi: int, value: float) -> None:
    """In place: x [..., c, R] over keys lo..lo+R-1 gets `value` outside each query's [start, end]."""
    r = x.shape[-1]
    if full_lo > lo:  # head columns [lo, full_lo)
        pos = torch.arange(lo, full_lo, device=x.device)
        x[..., : full_lo - lo].masked_fill_(pos[None, :] < start[:, None], value)
    if full_hi - lo + 1 < r:  # tail columns (full_hi, hi]
        pos = torch.arange(full_hi + 1, lo + r, device=x.device)
        x[..., full_hi - lo + 1 :].masked_fill_(pos[None, :] > end[:, None], value)
    if full_lo > full_hi:  # no column is shared by all queries: mask the middle too
        pos = torch.arange(lo, lo + r, device=x.device)
        x.masked_fill_((pos[None, :] < start[:, None]) | (pos[None, :] > end[:, None]), value)


class _RangeAttention(torch.autograd.Function):
    """Each query i attends keys start[i]..end[i] (inclusive); returns (out, lse) with lse differentiable.

    Queries are sorted by range end once and laid out [Hkv, M, G, hd], so a chunk of queries is a
    contiguous [Hkv, c·G, hd] view and every product is a plain bmm against [Hkv, R, hd] keys (GQA
    without copies). One chunk's scores ([Hkv, c·G, R]) are the only quadratic buffer.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        m, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (or fp64) accumulation
        order, start_s, end_s, chunks = plan.order, plan.start_s, plan.end_s, plan.chunks
        qh = q[order].to(acc).view(m, hkv, g, d).transpose(0, 1).contiguous()  # [hkv, m, g, d]
        kh = k.to(acc).transpose(0, 1).contiguous()  # [hkv, n, d]
        vh = v.to(acc).transpose(0, 1).contiguous()
        out_h = torch.empty(hkv, m, g, d, dtype=acc, device=q.device)
        lse_h = torch.empty(hkv, m, g, dtype=acc, device=q.device)
        for i, j, lo, hi, full_lo, full_hi in chunks:
            c = j - i
            s = torch.bmm(qh[:, i:j].reshape(hkv, c * g, d), kh[:, lo : hi + 1].transpose(1, 2)).mul_(scale)
            _edge_mask_(s.view(hkv, c, g, -1).transpose(1, 2), start_s[i:j], end_s[i:j], lo, full_lo, full_hi,
                        float("-inf"))
            mx = s.amax(-1, keepdim=True)
            mx = torch.where(torch.isfinite(mx), mx, 0.0)
            p = s.sub_(mx).exp_()
            total = p.sum(-1, keepdim=True)
            out_h[:, i:j] = torch.bmm(p, vh[:, lo : hi + 1]).div_(total).view(hkv, c, g, d)
            lse_h[:, i:j] = total.log_().add_(mx).view(hkv, c, g)
        dead, inv = plan.dead, plan.inv
        if bool(dead.any()):
            out_h.masked_fill_(dead[None, :, None, None], 0.0)
            lse_h.masked_fill_(dead[None, :, None], float("-inf"))
        ctx.save_for_backward(qh, kh, vh, start_s, end_s, out_h, lse_h, order, inv)
        ctx.shape, ctx.scale, ctx.chunks = (m, hq, d, k.dtype, v.dtype, q.dtype), scale, chunks
        out = out_h.transpose(0, 1).reshape(m, hq, d)[inv]
        lse = lse_h.transpose(0, 1).reshape(m, hq)[inv]
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qh, kh, vh, start_s, end_s, out_h, lse_h, order, inv = ctx.saved_tensors
        m, hq, d, kdt, vdt, qdt = ctx.shape
        hkv, g = kh.shape[0], hq // kh.shape[0]
        scale, acc = ctx.scale, out_h.dtype
        dout_h = (dout[order].to(acc).view(m, hkv, g, d).transpose(0, 1).contiguous()
                  if dout is not None else torch.zeros_like(out_h))
        delta = (dout_h * out_h).sum(-1)  # [hkv, m, g]
        if dlse is not None:
            delta -= dlse[order].to(acc).view(m, hkv, g).transpose(0, 1)
        dq_h = torch.zeros_like(qh)
        dk_h = torch.zeros_like(kh)
        dv_h = torch.zeros_like(vh)
        for i, j, lo, hi, full_lo, full_hi in ctx.chunks:
            c = j - i
            kc, vc = kh[:, lo : hi + 1], vh[:, lo : hi + 1]
            qc = qh[:, i:j].reshape(hkv, c * g, d)
            s = torch.bmm(qc, kc.transpose(1, 2)).mul_(scale)
            l = lse_h[:, i:j].reshape(hkv, c * g, 1)
            p = s.sub_(torch.where(torch.isfinite(l), l, 0.0)).exp_()
            p4 = p.view(hkv, c, g, -1).transpose(1, 2)
            _edge_mask_(p4, start_s[i:j], end_s[i:j], lo, full_lo, full_hi, 0.0)
            p4.masked_fill_((start_s[i:j] > end_s[i:j])[:, None], 0.0)
            do = dout_h[:, i:j].reshape(hkv, c * g, d)
            dv_h[:, lo : hi + 1] += torch.bmm(p.transpose(1, 2), do)
            dp = torch.bmm(do, vc.transpose(1, 2))
            ds = p.mul_(dp.sub_(delta[:, i:j].reshape(hkv, c * g, 1))).mul_(scale)
            dq_h[:, i:j] = torch.bmm(ds, kc).view(hkv, c, g, d)
            dk_h[:, lo : hi + 1] += torch.bmm(ds.transpose(1, 2), qc)
        dq = dq_h.transpose(0, 1).reshape(m, hq, d)[inv]
        return dq.to(qdt), dk_h.transpose(0, 1).to(kdt), dv_h.transpose(0, 1).to(vdt), None, None


def range_attention(
    q: Tensor, k: Tensor, v: Tensor, start: Tensor, end: Tensor, scale: float | None = None,
    budget: int = 1 << 20, plan: RangePlan | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention where query i sees keys start[i]..end[i]; returns (out [M, Hq, hd], lse [M, Hq] fp32).

    An empty range (start > end) gives out 0 and lse −inf. Memory: one [Hq, chunk, range] tile at a
    time (`budget` elements), in forward and backward. ``plan``: `RangePlan(start, end, Hq, budget)`
    when the same ranges serve several calls (every layer of a forward).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    plan = plan if plan is not None else RangePlan(start, end, q.shape[1], budget)
    return _RangeAttention.apply(q, k, v, plan, scale)


def masked_chunk_attention(q: Tensor, k: Tensor, v: Tensor, plan: RangePlan) -> Tensor:
    """`range_attention`'s output (no lse) through SDPA's fused kernel, one masked [c, R] tile per chunk:
    two fused ops per chunk (forward, backward) instead of a dozen, for queries that need no lse."""
    m, hq, d = q.shape
    qs = q.index_select(0, plan.order)
    out = q.new_zeros(m, hq, d)  # queries outside every chunk (empty ranges) keep 0
    for (i, j, lo, hi, _, _), mask in zip(plan.chunks, plan.masks(), strict=True):
        tile = F.scaled_dot_product_attention(
            qs[i:j].transpose(0, 1)[None], k[lo:hi + 1].transpose(0, 1)[None], v[lo:hi + 1].transpose(0, 1)[None],
            attn_mask=mask[None, None], enable_gqa=hq != k.shape[1])
        out[i:j] = tile[0].transpose(0, 1)
    out = out.masked_fill(plan.dead[:, None, None], 0.0)
    return out.index_select(0, plan.inv)


def _chain_part(q: Tensor, k: Tensor, v: Tensor, chain: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    r, hq, d = q.shape
    hkv = k.shape[1]
    valid = chain >= 0
    idx = chain.clamp(min=0)
    acc = torch.promote_types(q.dtype, torch.float32)
    flat = idx.reshape(-1)  # index_select: its backward is a fast index_add, not an accumulating index_put
    kc = k.index_select(0, flat).view(r, -1, hkv, d).to(acc)  # [r, c, hkv, d]
    vc = v.index_select(0, flat).view(r, -1, hkv, d).to(acc)
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
        stream_shape: tuple[int, int] | None = None,
    ):
        self.key_start, self.key_end = key_start, key_end
        self.rows = torch.nonzero((chain >= 0).any(dim=1)).squeeze(1)
        self.chain = chain[self.rows]
        self.num_context, self.context, self.record = num_context, context, record
        self.stream_shape = stream_shape
        self.num_stream = 0 if stream_shape is None else stream_shape[0] * stream_shape[1]
        self._plans: dict[tuple[str, int], RangePlan] = {}  # built on the first layer, reused by the others
        if stream_shape is not None:
            self.causal, self.stream_dead = _stream_layout(key_start, key_end, *stream_shape)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.record is not None:
            self.record[layer] = (k, v)
        if self.context is not None:
            k_ctx, v_ctx = self.context[layer]
        else:
            k_ctx, v_ctx = k[: self.num_context], v[: self.num_context]
        s = self.num_stream
        parts = [self._stream_attention(q[:s], k_ctx, v_ctx)] if s else []
        if q.shape[0] > s:
            out, lse = range_attention(q[s:], k_ctx, v_ctx, self.key_start[s:], self.key_end[s:],
                                       plan=self._plan("deep", q.shape[1]))
            if self.rows.numel():  # chain rows are never depth-0 stream rows
                rows = self.rows - s
                out_b, lse_b = chain_attention(q.index_select(0, self.rows), k, v, self.chain)
                merged = merge_attention(out.index_select(0, rows), lse.index_select(0, rows), out_b, lse_b)
                out = out.index_copy(0, rows, merged.to(out.dtype))
            parts.append(out)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _plan(self, which: str, heads: int) -> RangePlan:
        key = (which, heads)
        if key not in self._plans:
            s = self.num_stream
            part = slice(0, s) if which == "stream" else slice(s, None)
            self._plans[key] = RangePlan(self.key_start[part], self.key_end[part], heads)
        return self._plans[key]

    def _stream_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The depth-0 stream over itself: SDPA's fused causal kernel when every row is one document from
        position 0 (then padding), else each query over [document start, itself] in masked tiles that are
        at least half useful (`masked_chunk_attention`); one boolean [n, n] mask through SDPA would compute
        every row's full square, ~n / (document length) times the pairs needed (17× on the demo's rows)."""
        if not self.causal:
            return masked_chunk_attention(q, k, v, self._plan("stream", q.shape[1]))
        b, n = self.stream_shape
        heads = lambda x: x.view(b, n, x.shape[1], x.shape[2]).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), is_causal=True, enable_gqa=q.shape[1] != k.shape[1],
        ).transpose(1, 2).reshape(q.shape)
        return out.masked_fill(self.stream_dead[:, None, None], 0.0)


def _stream_layout(key_start: Tensor, key_end: Tensor, b: int, n: int) -> tuple[bool, Tensor]:
    """Whether the depth-0 stream of B rows × n is plain causal (every row one document from position 0,
    then padding), and its padding queries (empty range: they give 0)."""
    offset = (torch.arange(b, device=key_start.device) * n)[:, None]
    start = key_start[: b * n].view(b, n) - offset
    end = key_end[: b * n].view(b, n) - offset
    dead = start > end
    pos = torch.arange(n, device=start.device)
    trailing = (dead.long().cummax(dim=1).values.bool() == dead).all()
    causal = bool(trailing) and bool(((start == 0) & (end == pos) | dead).all())
    return causal, dead.reshape(-1)
