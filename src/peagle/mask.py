"""The COD attention predicate, in one place, used three ways.

Query element q may attend key element k iff q is not padding, both anchors lie in the same
document, and either k is real context at or before q's anchor (depth_k = 0, anchor_k ≤ anchor_q)
or k is on q's own chain at an earlier or equal depth (anchor_k = anchor_q, depth_k ≤ depth_q).
This is what vLLM's parallel-drafting runtime shows a mask slot (docs/conventions.md, "Flat input and mask").

1. `cod_mask`: the dense boolean [M, M] reference (tests, small inputs, the SDPA baseline).
2. `cod_block_mask` + `FlexCODAttention`: FlexAttention for CUDA (compiled, dynamic shapes).
3. `CODAttention`: the structured path that trains anywhere, CPU included. A query's visible keys
   are a contiguous range of the depth-0 stream ([document start, anchor]) plus at most d elements
   of its own chain. Queries sorted by anchor are cut into chunks; a chunk's keys are its range
   union plus the window of its own elements that holds the chains, and one fused flash-attention
   call (forward and backward) computes it under an additive mask (`tile_attention`). No M×M matrix
   and no score tile is stored; chunks are sized so that at least half of every tile is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

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
# Structured path: tile attention through the CPU flash kernel.


# Queries are sorted by range end and cut into chunks; a chunk's keys are the union of its queries'
# context ranges plus a window of the queries' own elements holding their chains, and one fused flash
# call (forward, and one backward) computes the chunk under an additive mask. The greedy split keeps
# every tile at least half made of pairs a query needs (or under _SMALL_TILE pairs, where the call's
# fixed cost dominates the waste) and at most _TILE_PAIRS pairs (the mask's memory). The old fixed
# chunk of up to 1024 queries spent ~14 products per useful one on the demo's rows of short chats.
_SMALL_TILE = 1 << 14
_MAX_WASTE = 2.0  # a tile may hold at most this many pairs per needed one (above _SMALL_TILE)
_TILE_PAIRS = 1 << 18
_MAX_CHUNK = 1024
# Masks are kept for the layers and the backward up to this many bytes per plan, then rebuilt per call.
_KEEP_MASK_BYTES = 64 << 20

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _chunks(start: list[int], end: list[int], own_lo: list[int], own_hi: list[int], own_count: list[int],
            tile_pairs: int) -> list[tuple[int, int, int, int, int, int]]:
    """Split queries (sorted by range end) into chunks (i, j, lo, hi, a, b) whose tiles are mostly useful.

    Queries i..j-1 see context keys within [lo, hi] (lo > hi: none) and own keys within [a, b). A
    query with nothing visible (empty range, no chain) starts no chunk and is skipped inside one.
    """
    out = []
    i, n = 0, len(end)
    while i < n:
        if start[i] > end[i] and not own_count[i]:
            i += 1
            continue
        lo, hi, a, b = start[i], end[i], own_lo[i], own_hi[i] + 1
        useful = max(0, end[i] - start[i] + 1) + own_count[i]
        j = i + 1
        while j < n and j - i < _MAX_CHUNK:
            ranged, owned = start[j] <= end[j], own_count[j] > 0
            if not ranged and not owned:  # nothing visible: costs a masked row only
                j += 1
                continue
            n_lo, n_hi = (min(lo, start[j]), max(hi, end[j])) if ranged else (lo, hi)
            n_a, n_b = (min(a, own_lo[j]), max(b, own_hi[j] + 1)) if owned else (a, b)
            n_useful = useful + max(0, end[j] - start[j] + 1) + own_count[j]
            area = (j + 1 - i) * (max(0, n_hi - n_lo + 1) + max(0, n_b - n_a))
            if area > tile_pairs or (area > _SMALL_TILE and area > _MAX_WASTE * n_useful):
                break
            lo, hi, a, b, useful, j = n_lo, n_hi, n_a, n_b, n_useful, j + 1
        if lo > hi:
            lo, hi = 0, -1
        if a >= b:
            a = b = 0
        out.append((i, j, lo, hi, a, b))
        i = j
    return out


class TilePlan:
    """One forward's query order, chunks and masks, built once and shared by every layer and the backward
    (the ranges and chains of a COD batch are the same in all layers).

    Query i sees context keys start[i]..end[i] (inclusive; start > end: none) and, with ``chain``
    [M, C] (indices into the queries themselves, −1 = none), its own chain's elements.
    """

    def __init__(self, start: Tensor, end: Tensor, chain: Tensor | None = None, tile_pairs: int = _TILE_PAIRS):
        m = end.numel()
        self.order = torch.argsort(end, stable=True)
        self.inv = torch.empty_like(self.order)
        self.inv[self.order] = torch.arange(m, device=end.device)
        self.start_s, self.end_s = start[self.order], end[self.order]
        big = torch.iinfo(torch.long).max
        if chain is not None and chain.shape[1]:
            ch = chain[self.order]
            self.own = torch.where(ch >= 0, self.inv[ch.clamp(min=0)], -1)  # sorted positions of chain keys
            valid = self.own >= 0
            own_lo, own_hi = torch.where(valid, self.own, big).amin(1).tolist(), self.own.amax(1).tolist()
            own_count = valid.sum(1)
        else:
            self.own, own_lo, own_hi = None, [big] * m, [-1] * m
            own_count = torch.zeros(m, dtype=torch.long, device=end.device)
        self.chunks = _chunks(self.start_s.tolist(), self.end_s.tolist(), own_lo, own_hi, own_count.tolist(),
                              tile_pairs)
        self.has_own = any(b > a for *_, a, b in self.chunks)
        covered = torch.zeros(m, dtype=torch.bool, device=end.device)
        for i, j, *_ in self.chunks:
            covered[i:j] = True
        nothing = (self.start_s > self.end_s) & (own_count == 0)
        self.dead = (nothing | ~covered)[self.inv]  # in the queries' own order: these give 0
        self._masks: dict[tuple[int, torch.dtype], Tensor] = {}
        self._kept = 0

    def mask(self, index: int, dtype: torch.dtype) -> Tensor:
        """Chunk `index`'s additive mask [c, R + W] (0 visible, −inf not) over its context then own keys.
        A query that sees nothing sees its first key instead (the kernel stays finite; its output is 0)."""
        key = (index, dtype)
        if key in self._masks:
            return self._masks[key]
        i, j, lo, hi, a, b = self.chunks[index]
        pos = torch.arange(lo, hi + 1, device=self.end_s.device)
        vis = (pos[None, :] >= self.start_s[i:j, None]) & (pos[None, :] <= self.end_s[i:j, None])
        if b > a:
            rel = self.own[i:j] - a
            own = torch.zeros(j - i, b - a + 1, dtype=torch.bool, device=vis.device)
            own.scatter_(1, torch.where(self.own[i:j] >= 0, rel, b - a), True)  # column b - a: the −1 slots
            vis = torch.cat([vis, own[:, : b - a]], dim=1)
        vis[:, 0] |= ~vis.any(dim=1)
        mask = torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, float("-inf"))
        size = mask.numel() * mask.element_size()
        if self._kept + size <= _KEEP_MASK_BYTES:
            self._masks[key], self._kept = mask, self._kept + size
        return mask


def _tile(ctx_keys: Tensor, own_keys: Tensor | None, lo: int, hi: int, a: int, b: int, groups: int) -> Tensor:
    """One chunk's keys [groups, Hkv, R + W, hd]: the context range then the own window (groups: a
    stride-0 batch, so each kv head serves its query group without copies)."""
    tile = ctx_keys[:, lo:hi + 1]
    if b > a:
        tile = torch.cat([tile, own_keys[:, a:b]], dim=1)
    return tile[None].expand(groups, -1, -1, -1)


class _TileAttention(torch.autograd.Function):
    """Forward and backward of `tile_attention`, chunk by chunk through the CPU flash kernel.

    Queries are laid out [G, Hkv, M, hd] (G = query heads per kv head as the kernel's batch), sorted
    by range end, so a chunk is a view; keys [Hkv, n, hd]. Saved: q, k, v, the output and its lse;
    the key tiles are re-cut in backward. Gradients of the keys are summed over the query groups.
    """

    @staticmethod
    def forward(ctx, q, k_ctx, v_ctx, k_own, v_own, plan, scale):  # noqa: ANN001, ANN205
        m, hq, d = q.shape
        hkv = k_ctx.shape[1]
        g = hq // hkv
        qh = q.index_select(0, plan.order).view(m, hkv, g, d).permute(2, 1, 0, 3).contiguous()
        kc, vc = k_ctx.transpose(0, 1).contiguous(), v_ctx.transpose(0, 1).contiguous()
        ko = vo = None
        if plan.has_own:
            ko = k_own.index_select(0, plan.order).transpose(0, 1).contiguous()
            vo = v_own.index_select(0, plan.order).transpose(0, 1).contiguous()
        out_h = q.new_zeros(g, hkv, m, d)
        lse_h = torch.zeros(g, hkv, m, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        for index, (i, j, lo, hi, a, b) in enumerate(plan.chunks):
            out, lse = _flash(qh[:, :, i:j], _tile(kc, ko, lo, hi, a, b, g), _tile(vc, vo, lo, hi, a, b, g),
                              0.0, False, attn_mask=plan.mask(index, q.dtype)[None, None], scale=scale)
            out_h[:, :, i:j], lse_h[:, :, i:j] = out, lse
        ctx.save_for_backward(qh, kc, vc, ko, vo, out_h, lse_h)
        ctx.plan, ctx.scale = plan, scale
        return out_h.permute(2, 1, 0, 3).reshape(m, hq, d).index_select(0, plan.inv)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        qh, kc, vc, ko, vo, out_h, lse_h = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        g, hkv, m, d = qh.shape
        dout_h = dout.index_select(0, plan.order).view(m, hkv, g, d).permute(2, 1, 0, 3).contiguous()
        dq_h, dkc, dvc = torch.zeros_like(qh), torch.zeros_like(kc), torch.zeros_like(vc)
        dko = dvo = None
        if ko is not None:
            dko, dvo = torch.zeros_like(ko), torch.zeros_like(vo)
        for index, (i, j, lo, hi, a, b) in enumerate(plan.chunks):
            dq, dk, dv = _flash_backward(
                dout_h[:, :, i:j], qh[:, :, i:j], _tile(kc, ko, lo, hi, a, b, g), _tile(vc, vo, lo, hi, a, b, g),
                out_h[:, :, i:j], lse_h[:, :, i:j], 0.0, False, attn_mask=plan.mask(index, qh.dtype)[None, None],
                scale=scale)
            dq_h[:, :, i:j] = dq
            dk, dv, r = dk.sum(0), dv.sum(0), hi - lo + 1
            dkc[:, lo:hi + 1] += dk[:, :r]
            dvc[:, lo:hi + 1] += dv[:, :r]
            if b > a:
                dko[:, a:b] += dk[:, r:]
                dvo[:, a:b] += dv[:, r:]
        dq = dq_h.permute(2, 1, 0, 3).reshape(m, g * hkv, d).index_select(0, plan.inv)
        dk_own = dv_own = None  # own keys no tile held get no gradient
        if dko is not None:  # own keys came in the queries' order, the tiles hold them sorted
            dk_own = dko.transpose(0, 1).index_select(0, plan.inv)
            dv_own = dvo.transpose(0, 1).index_select(0, plan.inv)
        return dq, dkc.transpose(0, 1), dvc.transpose(0, 1), dk_own, dv_own, None, None


def tile_attention(
    q: Tensor, k_ctx: Tensor, v_ctx: Tensor, plan: TilePlan, k_own: Tensor | None = None,
    v_own: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """Attention where query i sees context keys start[i]..end[i] and its chain among the queries' own
    keys (`plan`'s ranges and chains); out [M, Hq, hd], 0 for a query that sees nothing.

    q [M, Hq, hd]; k_ctx / v_ctx [n, Hkv, hd]; k_own / v_own [M, Hkv, hd] (the queries' own keys, when
    the plan has chains). Memory beyond q, k, v and the output: one chunk's mask at a time (plus the
    kept masks) and the flash kernel's blocks; no score matrix is stored.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type == "cpu":
        out = _TileAttention.apply(q, k_ctx, v_ctx, k_own, v_own, plan, scale)
    else:
        out = _sdpa_tiles(q, k_ctx, v_ctx, k_own, v_own, plan, scale)
    return out.masked_fill(plan.dead[:, None, None], 0.0)


def _sdpa_tiles(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_own: Tensor | None, v_own: Tensor | None,
                plan: TilePlan, scale: float) -> Tensor:
    """The same tiles through the public SDPA with autograd per chunk: any device (CUDA evaluation and
    sequence partitions; the CPU flash ops behind `_TileAttention` are CPU-only)."""
    m, hq, d = q.shape
    qs = q.index_select(0, plan.order)
    heads = lambda x: x.transpose(0, 1)  # noqa: E731 - [n, H, hd] -> [H, n, hd], as `_tile` takes them
    kc, vc = heads(k_ctx), heads(v_ctx)
    ko = heads(k_own.index_select(0, plan.order)) if plan.has_own else None
    vo = heads(v_own.index_select(0, plan.order)) if plan.has_own else None
    out = q.new_zeros(m, hq, d)  # queries outside every chunk keep 0
    for index, (i, j, lo, hi, a, b) in enumerate(plan.chunks):
        tile = F.scaled_dot_product_attention(heads(qs[i:j])[None], _tile(kc, ko, lo, hi, a, b, 1),
                                              _tile(vc, vo, lo, hi, a, b, 1),
                                              attn_mask=plan.mask(index, q.dtype)[None, None], scale=scale,
                                              enable_gqa=hq != k_ctx.shape[1])
        out[i:j] = tile[0].transpose(0, 1)
    return out.index_select(0, plan.inv)


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
        self.num_context, self.context, self.record = num_context, context, record
        self.stream_shape = stream_shape
        self.num_stream = s = 0 if stream_shape is None else stream_shape[0] * stream_shape[1]
        # the queries past the stream see their range and their own chain (chain keys are never stream rows)
        own_chain = chain[s:]
        self.deep = TilePlan(key_start[s:], key_end[s:], torch.where(own_chain >= 0, own_chain - s, -1))
        self.stream = None
        if stream_shape is not None:
            self.causal, self.stream_dead = _stream_layout(key_start, key_end, *stream_shape)
            if not self.causal:
                self.stream = TilePlan(key_start[:s], key_end[:s])

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
            parts.append(tile_attention(q[s:], k_ctx, v_ctx, self.deep, k[s:], v[s:]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _stream_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The depth-0 stream over itself: SDPA's fused causal kernel when every row is one document from
        position 0 (then padding), else each query over [document start, itself] in masked tiles that are
        at least half useful (`tile_attention`); one boolean [n, n] mask through SDPA would compute every
        row's full square, ~n / (document length) times the pairs needed (17× on the demo's rows)."""
        if not self.causal:
            return tile_attention(q, k, v, self.stream)
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
