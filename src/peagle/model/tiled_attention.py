"""The structured COD attention: trains anywhere (CPU included), equal to the dense mask.

A query's visible keys (`peagle.model.mask`: the COD predicate) are a contiguous range of the depth-0
stream ([document start, anchor]) plus at most d elements of its own chain. The range part runs as
chunks of queries sorted by anchor, one fused flash-attention call each (forward and backward) under
an additive mask; the chain part as small causal blocks of each anchor's group; the two merge by
log-sum-exp (`tile_attention`, a custom autograd function). No M×M matrix and no context score tile is
stored; chunks are sized so that at least half of every tile is needed. `CODAttention` is the layer
protocol's callable (`peagle.model.layers.AttentionFn`); docs/internals.md describes the plan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# A query sees a contiguous range of context keys and the elements of its own chain. The two key sets
# are computed apart and merged by their log-sum-exps (docs/internals.md, `peagle.model.mask`):
# - context: queries sorted by range end are cut into chunks; a chunk's keys are its queries' range
#   union and one fused flash call (forward, and one backward) computes it under an additive mask. The
#   greedy split keeps every tile at least 1/_MAX_WASTE made of pairs a query needs (or under
#   _SMALL_TILE pairs, where the call's fixed cost dominates the waste) and at most _FLASH_TILE_PAIRS
#   pairs on CPU (only the chunk's [c, R] mask is stored; the kernel works in blocks) or _TILE_PAIRS on
#   other devices (the plain path stores the chunk's scores for every head). A cap of 2^18 pairs on CPU
#   left R = 32768 keys 8 queries per flash call: the step grew ~5x per doubling of L past 8192 (2.1x
#   the FLOP floor at L = 8192, 3.4x at 16384, 7.8x at 32768 on a loaded machine); 2^22 halved the L = 8192 step
#   (benchmarks/step.py's draft, S = 8, interleaved in one process) and is no slower at L = 2048;
# - own chains: the queries of one anchor are a group of s elements (depths 1..s), query c seeing the
#   group's columns 0..c. The groups are laid out in a grid of blocks, each [groups, w] for one width
#   w (padding slots see only themselves), so all chains are a few [groups, w, w] causal blocks of
#   scores (small einsums), not a window in every context tile (that window was 16-42 % of the
#   tiles' area for 0.3-1.2 % of the pairs). Which group sizes share a block (padded to its widest)
#   is chosen by a cost model: a block's ops cost about as much as _BLOCK_SLOTS padded slots
#   (measured at L = 2048: a block per size was 6 % faster than one grid with S = 1, 9 % slower with
#   S = 8, where 8 partitions x 5 sizes x 4 layers of small ops added up).
_SMALL_TILE = 1 << 14
_MAX_WASTE = 2.0  # a tile may hold at most this many pairs per needed one (above _SMALL_TILE)
_TILE_PAIRS = 1 << 18
_FLASH_TILE_PAIRS = 1 << 22
_MAX_CHUNK = 1024
_BLOCK_SLOTS = 340
# Masks are kept for the layers and the backward up to this many bytes per plan, then rebuilt per call.
_KEEP_MASK_BYTES = 64 << 20

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _chunks(start: list[int], end: list[int], tile_pairs: int) -> list[tuple[int, int, int, int]]:
    """Split queries (sorted by range end) into chunks (i, j, lo, hi) whose tiles are mostly useful:
    queries i..j-1 see context keys within [lo, hi]. A query with an empty range is in no chunk (its
    context part is empty), so every row of a tile sees at least one key."""
    out = []
    i, n = 0, len(end)
    while i < n:
        if start[i] > end[i]:
            i += 1
            continue
        lo, hi, useful, j = start[i], end[i], end[i] - start[i] + 1, i + 1
        while j < n and j - i < _MAX_CHUNK and start[j] <= end[j]:
            n_lo, n_hi = min(lo, start[j]), max(hi, end[j])
            n_useful = useful + end[j] - start[j] + 1
            area = (j + 1 - i) * (n_hi - n_lo + 1)
            if area > tile_pairs or (area > _SMALL_TILE and area > _MAX_WASTE * n_useful):
                break
            lo, hi, useful, j = n_lo, n_hi, n_useful, j + 1
        out.append((i, j, lo, hi))
        i = j
    return out


def _own_groups(chain: Tensor | None, m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per query: its own-chain group's size (0: no own keys), its column in the group, the group id.

    ``chain`` [M, C]: query i's own keys, column j holding the group's element at column j for
    j <= i's column (itself there) and -1 beyond, as `cod.chains` builds them (column = depth - 1;
    the group = one anchor's deep elements, prefix-closed). Anything else is refused.
    """
    rows = torch.arange(m, device=device)
    if chain is None or chain.shape[1] == 0:
        return torch.zeros_like(rows), torch.zeros_like(rows), rows
    valid = chain >= 0
    count = valid.sum(1)
    col, has = (count - 1).clamp(min=0), count > 0
    cols = torch.arange(chain.shape[1], device=device)
    ok = bool((valid == (cols[None, :] < count[:, None])).all()) and bool((chain < m).all())  # a prefix
    if ok:
        group, ref = torch.where(has, chain[:, 0], rows), chain.clamp(min=0)
        size = torch.zeros_like(rows).index_add_(0, group, has.long())
        top = torch.zeros_like(rows).scatter_reduce_(0, group, col, "amax")
        ok = (bool((chain[rows, col] == rows)[has].all())  # the query itself at its column
              and bool(((group[ref] == group[:, None]) & (col[ref] == cols[None, :]) | ~valid).all())
              and bool((size == top + 1)[group[has]].all()))  # one element per column
    if not ok:
        raise ValueError("chain: each query's own keys must be its group's elements by column, itself "
                         "last (COD chains: its anchor's elements at depths 1..d)")
    return torch.where(has, size[group], 0), col, group


def _own_grid(size: Tensor, col: Tensor, group: Tensor) -> tuple[Tensor, Tensor, list[tuple[int, int, Tensor]]]:
    """Lay the own groups out in blocks: each query with own keys' slot [M'] (in `size > 0` order), each
    slot's query [slots] (padding: query 0's index), and the blocks (a, b, visible [groups, w, w]) over
    slots a..b. Group sizes are split into runs (one block each, padded to the run's widest) that
    minimise sum(_BLOCK_SLOTS + slots), by dynamic programming over the distinct sizes."""
    rows = torch.nonzero(size > 0).squeeze(1)
    _, of_group = torch.unique(group[rows], return_inverse=True)
    group_size = torch.zeros(int(of_group.max()) + 1, dtype=torch.long, device=size.device)
    group_size[of_group] = size[rows]
    widths, counts = (t.tolist() for t in torch.unique(group_size, return_counts=True))
    best = [(0, -1)]  # best[j]: (cost of the first j sizes, where its last run starts)
    for j in range(1, len(widths) + 1):
        best.append(min((best[i][0] + _BLOCK_SLOTS + sum(counts[i:j]) * widths[j - 1], i) for i in range(j)))
    runs, j = [], len(widths)
    while j:
        runs.append((best[j][1], j))
        j = best[j][1]
    group_slot = torch.empty_like(group_size)
    blocks, offset = [], 0
    cols = torch.arange(max(widths), device=size.device)
    for i, j in reversed(runs):
        w = widths[j - 1]
        members = torch.nonzero((group_size >= widths[i]) & (group_size <= w)).squeeze(1)
        group_slot[members] = offset + w * torch.arange(members.numel(), device=size.device)
        real = cols[None, :w] < group_size[members, None]
        causal, diagonal = cols[None, :w] <= cols[:w, None], cols[None, :w] == cols[:w, None]
        visible = (causal & real[:, :, None] & real[:, None, :]) | (diagonal & ~real[:, :, None])
        blocks.append((offset, offset + w * members.numel(), visible))
        offset += w * members.numel()
    slots = group_slot[of_group] + col[rows]
    grid_rows = torch.zeros(offset, dtype=torch.long, device=size.device)
    grid_rows[slots] = rows
    return slots, grid_rows, blocks


def _lexsort(*keys: Tensor) -> Tensor:
    """The order that sorts by keys[0], then keys[1], ... (stable)."""
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.argsort(key[order], stable=True)]
    return order


class TilePlan:
    """One forward's query order, context chunks, masks and own-chain blocks, built once and shared by
    every layer and the backward (the ranges and chains of a COD batch are the same in all layers).

    Query i sees context keys start[i]..end[i] (inclusive; start > end: none) and, with ``chain``
    [M, C] (indices into the queries themselves, -1 = none; see `_own_groups`), its own chain.
    ``order`` sorts the queries by range end for the context chunks. The own chains: ``own_rows``
    (the queries with own keys) sit at ``own_slots`` of a grid of slots (`_own_grid`); ``grid_rows``
    is each slot's query, ``own_blocks`` (a, b, visible [groups, w, w]) what the slots a..b see (a
    query its group's columns up to its own; padding only itself). ``*_pos``: the same rows'
    positions in ``order``.
    """

    def __init__(self, start: Tensor, end: Tensor, chain: Tensor | None = None, tile_pairs: int | None = None):
        m = end.numel()
        if tile_pairs is None:
            tile_pairs = _FLASH_TILE_PAIRS if end.device.type == "cpu" else _TILE_PAIRS
        size, col, group = _own_groups(chain, m, end.device)
        self.order = _lexsort((start > end).long(), end)  # empty ranges last: they are in no chunk
        self.inv = torch.empty_like(self.order)
        self.inv[self.order] = torch.arange(m, device=end.device)
        self.start_s, self.end_s = start[self.order], end[self.order]
        self.chunks = _chunks(self.start_s.tolist(), self.end_s.tolist(), tile_pairs)
        self.own_rows = torch.nonzero(size > 0).squeeze(1)
        self.has_own = self.own_rows.numel() > 0
        if self.has_own:
            self.own_slots, self.grid_rows, self.own_blocks = _own_grid(size, col, group)
            self.own_pos, self.grid_pos = self.inv[self.own_rows], self.inv[self.grid_rows]
        self._masks: dict[tuple[int, torch.dtype], Tensor] = {}
        self._kept = 0

    def mask(self, index: int, dtype: torch.dtype) -> Tensor:
        """Chunk `index`'s additive mask [c, R] (0 visible, -inf not) over its context keys."""
        key = (index, dtype)
        if key in self._masks:
            return self._masks[key]
        i, j, lo, hi = self.chunks[index]
        pos = torch.arange(lo, hi + 1, device=self.end_s.device)
        vis = (pos[None, :] >= self.start_s[i:j, None]) & (pos[None, :] <= self.end_s[i:j, None])
        mask = torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, float("-inf"))
        size = mask.numel() * mask.element_size()
        if self._kept + size <= _KEEP_MASK_BYTES:
            self._masks[key], self._kept = mask, self._kept + size
        return mask


def _tile(keys: Tensor, lo: int, hi: int, groups: int) -> Tensor:
    """One chunk's keys [groups, Hkv, R, hd] (groups: a stride-0 batch, so each kv head serves its
    query group without copies)."""
    return keys[None, :, lo:hi + 1].expand(groups, -1, -1, -1)


def _by_kv_head(x: Tensor, order: Tensor, hkv: int) -> Tensor:
    """[M, Hq, hd] -> [G, Hkv, len(order), hd]: the rows `order`, by kv head (G = query heads per kv head)."""
    _, hq, d = x.shape
    return x.index_select(0, order).view(order.numel(), hkv, hq // hkv, d).permute(2, 1, 0, 3).contiguous()


def _own_scores(q: Tensor, k: Tensor, visible: Tensor, scale: float) -> Tensor:
    """Scores of the own grid, q [G, Hkv, n·w, hd] against k [Hkv, n·w, hd]: [G, Hkv, n, w, w], -inf
    where `visible` [n, w, w] is False."""
    g, hkv, nw, d = q.shape
    n, w = visible.shape[:2]  # einsum, not a broadcast matmul: it folds G into the rows (2x faster here)
    acc = _acc(q.dtype)  # bf16 inputs: scores, softmax and lse in fp32 (blocks are small), autocast or not
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.einsum("ghnid,hnjd->ghnij", q.reshape(g, hkv, n, w, d).to(acc),
                              k.reshape(hkv, n, w, d).to(acc))
    return (scores * scale).masked_fill(~visible, float("-inf"))


def _own_values(p: Tensor, v: Tensor) -> Tensor:
    """Probabilities p [G, Hkv, n, w, w] of an own block times its values v [Hkv, n·w, hd]: [G, Hkv, n·w, hd]
    in p's dtype (fp32 for bf16 values)."""
    g, hkv, n, w = p.shape[:4]
    with torch.autocast(p.device.type, enabled=False):
        out = torch.einsum("ghnij,hnjd->ghnid", p, v.reshape(hkv, n, w, -1).to(p.dtype))
    return out.reshape(g, hkv, n * w, -1)


def _own_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The own grid's attention alone: out [G, Hkv, n·w, hd] and its lse [G, Hkv, n·w]."""
    scores = _own_scores(q, k, visible, scale)
    lse = torch.logsumexp(scores, -1)
    return _own_values(torch.exp(scores - lse[..., None]), v).to(q.dtype), lse.reshape(q.shape[:3])


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics are kept in: fp32 for bf16/fp16 inputs, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def _merged_lse(lse_a: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The lse over two disjoint key sets (-inf: no keys), in fp32 at least, with both parts floored at
    that dtype's lowest finite value, so no keys on either side gives weights 0, not NaN, forward and
    backward."""
    acc = _acc(torch.promote_types(lse_a.dtype, lse_b.dtype))
    lowest = torch.finfo(acc).min
    lse_a, lse_b = lse_a.to(acc).clamp(min=lowest), lse_b.to(acc).clamp(min=lowest)
    return lse_a, lse_b, torch.logaddexp(lse_a, lse_b)


def _merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over two disjoint key sets from each one's output and lse (no keys: output 0)."""
    lse_a, lse_b, lse = _merged_lse(lse_a, lse_b)
    out = out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]
    return out.to(out_a.dtype), lse


def _own_backward(dout: Tensor, delta: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor, scale: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the own grid from its final probabilities p [G, Hkv, n, w, w] and delta = rowsum(dout
    · out) [G, Hkv, n·w] of the merged softmax (so the context tiles' backward is independent): dq [G,
    Hkv, n·w, hd], dk, dv [Hkv, n·w, hd]. Padding slots see only themselves: what they produce lands on
    padding slots."""
    g, hkv, nw, d = q.shape
    n, w = p.shape[2:4]
    shape = (g, hkv, n, w, d)
    do, qs = dout.reshape(shape).to(p.dtype), q.reshape(shape).to(p.dtype)  # in the forward's precision
    ks, vs = k.reshape(shape[1:]).to(p.dtype), v.reshape(shape[1:]).to(p.dtype)
    delta = delta.to(p.dtype)
    with torch.autocast(p.device.type, enabled=False):
        ds = p * (torch.einsum("ghnid,hnjd->ghnij", do, vs) - delta.reshape(shape[:-1])[..., None])
        ds = ds.mul_(scale)
        dq = torch.einsum("ghnij,hnjd->ghnid", ds, ks).reshape(g, hkv, nw, d)
        dk = torch.einsum("ghnij,ghnid->hnjd", ds, qs).reshape(hkv, nw, d)
        dv = torch.einsum("ghnij,ghnid->hnjd", p, do).reshape(hkv, nw, d)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _TileAttention(torch.autograd.Function):
    """Forward and backward of `tile_attention` on CPU: context chunks through the flash kernel, own
    blocks by hand, merged by lse.

    Queries are laid out [G, Hkv, M, hd] (G = query heads per kv head as the kernel's batch) in the
    plan's order, so a chunk is a view; keys [Hkv, n, hd]. Saved: q, k, v, the own grid's keys and
    values, the merged output and lse, and the own blocks' final probabilities. Both backwards are
    given the merged output and lse, which makes each key set's gradient exact on its own (the
    softmax's D = rowsum(dout * out) is the final one).
    """

    @staticmethod
    def forward(ctx, q, k_ctx, v_ctx, k_own, v_own, plan, scale):  # noqa: ANN001, ANN205
        m, hq, d = q.shape
        hkv = k_ctx.shape[1]
        g = hq // hkv
        qh = _by_kv_head(q, plan.order, hkv)
        kc, vc = k_ctx.transpose(0, 1).contiguous(), v_ctx.transpose(0, 1).contiguous()
        out_h = q.new_zeros(g, hkv, m, d)
        lse_h = torch.full((g, hkv, m), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32),
                           device=q.device)
        for index, (i, j, lo, hi) in enumerate(plan.chunks):
            out, lse = _flash(qh[:, :, i:j], _tile(kc, lo, hi, g), _tile(vc, lo, hi, g), 0.0, False,
                              attn_mask=plan.mask(index, q.dtype)[None, None], scale=scale)[:2]
            out_h[:, :, i:j], lse_h[:, :, i:j] = out, lse
        ko, vo, p = None, None, []
        if plan.has_own:  # the own grid, merged into the context result in place
            ko, vo = _by_kv_head(k_own, plan.grid_rows, hkv)[0], _by_kv_head(v_own, plan.grid_rows, hkv)[0]
            qo = qh.index_select(2, plan.grid_pos)
            scores = [_own_scores(qo[:, :, a:b], ko[:, a:b], visible, scale) for a, b, visible in plan.own_blocks]
            own_lse = torch.cat([torch.logsumexp(x, -1).reshape(g, hkv, -1) for x in scores], 2)
            ctx_lse, _, lse = _merged_lse(lse_h.index_select(2, plan.own_pos), own_lse.index_select(2, plan.own_slots))
            own_lse.index_copy_(2, plan.own_slots, lse)  # the merged lse at real slots, the own one at padding
            p = [torch.exp(x - own_lse[:, :, a:b].view(x.shape[:-1])[..., None])
                 for x, (a, b, _) in zip(scores, plan.own_blocks, strict=True)]
            own = torch.cat([_own_values(x, vo[:, a:b]) for x, (a, b, _) in zip(p, plan.own_blocks, strict=True)], 2)
            out = out_h.index_select(2, plan.own_pos) * (ctx_lse - lse).exp()[..., None]
            out_h.index_copy_(2, plan.own_pos, (out + own.index_select(2, plan.own_slots)).to(out_h.dtype))
            lse_h.index_copy_(2, plan.own_pos, lse)
        ctx.save_for_backward(qh, kc, vc, ko, vo, out_h, lse_h, *p)
        ctx.plan, ctx.scale = plan, scale
        return out_h.permute(2, 1, 0, 3).reshape(m, hq, d).index_select(0, plan.inv)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        qh, kc, vc, ko, vo, out_h, lse_h, *p = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        g, hkv, m, d = qh.shape
        dout_h = _by_kv_head(dout, plan.order, hkv)
        dq_h, dkc, dvc = torch.zeros_like(qh), torch.zeros_like(kc), torch.zeros_like(vc)
        for index, (i, j, lo, hi) in enumerate(plan.chunks):
            dq, dk, dv = _flash_backward(
                dout_h[:, :, i:j], qh[:, :, i:j], _tile(kc, lo, hi, g), _tile(vc, lo, hi, g),
                out_h[:, :, i:j], lse_h[:, :, i:j], 0.0, False, attn_mask=plan.mask(index, qh.dtype)[None, None],
                scale=scale)
            dq_h[:, :, i:j] = dq
            dkc[:, lo:hi + 1] += dk.sum(0)
            dvc[:, lo:hi + 1] += dv.sum(0)
        dk_own = dv_own = None
        if ko is not None:  # each own key is one query's: its gradient is its slot's
            delta = (dout_h.to(lse_h.dtype) * out_h.to(lse_h.dtype)).sum(-1)
            do, dl, qo = (x.index_select(2, plan.grid_pos) for x in (dout_h, delta, qh))
            grads = [_own_backward(do[:, :, a:b], dl[:, :, a:b], qo[:, :, a:b], ko[:, a:b], vo[:, a:b], x, scale)
                     for x, (a, b, _) in zip(p, plan.own_blocks, strict=True)]
            dq, dk, dv = (torch.cat(t, dim) for t, dim in zip(zip(*grads, strict=True), (2, 1, 1), strict=True))
            dq_h.index_add_(2, plan.own_pos, dq.index_select(2, plan.own_slots))
            dk_own, dv_own = (x.new_zeros(m, hkv, d).index_copy_(0, plan.own_rows,
                                                                 x.index_select(1, plan.own_slots).transpose(0, 1))
                              for x in (dk, dv))
        dq = dq_h.permute(2, 1, 0, 3).reshape(m, g * hkv, d).index_select(0, plan.inv)
        return dq, dkc.transpose(0, 1), dvc.transpose(0, 1), dk_own, dv_own, None, None


def tile_attention(
    q: Tensor, k_ctx: Tensor, v_ctx: Tensor, plan: TilePlan, k_own: Tensor | None = None,
    v_own: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """Attention where query i sees context keys start[i]..end[i] and its chain among the queries' own
    keys (`plan`'s ranges and chains); out [M, Hq, hd], 0 for a query that sees nothing.

    q [M, Hq, hd]; k_ctx / v_ctx [n, Hkv, hd]; k_own / v_own [M, Hkv, hd] (the queries' own keys, when
    the plan has chains). Memory beyond q, k, v and the output: one chunk's mask at a time (plus the
    kept masks), the flash kernel's blocks and the own blocks' [w, w] probabilities; no context score
    matrix is stored.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type == "cpu":
        return _TileAttention.apply(q, k_ctx, v_ctx, k_own, v_own, plan, scale)
    return _plain_tiles(q, k_ctx, v_ctx, k_own, v_own, plan, scale)


def _context_chunk(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One chunk's attention and lse in plain ops: q [G, Hkv, c, hd], k / v [G, Hkv, R, hd], mask [c, R]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + mask
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v), lse


def _plain_tiles(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_own: Tensor | None, v_own: Tensor | None,
                 plan: TilePlan, scale: float) -> Tensor:
    """The same chunks and blocks in plain ops with autograd: any device (CUDA sequence partitions and
    `attention="structured"` there; the CPU flash ops behind `_TileAttention` are CPU-only). Each
    chunk is recomputed in backward (checkpointed), so memory stays one chunk's scores."""
    m, hq, d = q.shape
    hkv = k_ctx.shape[1]
    g = hq // hkv
    qh = _by_kv_head(q, plan.order, hkv)
    kc, vc = k_ctx.transpose(0, 1), v_ctx.transpose(0, 1)
    out_h = q.new_zeros(g, hkv, m, d)
    lse_h = torch.full((g, hkv, m), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32),
                       device=q.device)
    for index, (i, j, lo, hi) in enumerate(plan.chunks):
        out_h[:, :, i:j], lse_h[:, :, i:j] = checkpoint(
            _context_chunk, qh[:, :, i:j], _tile(kc, lo, hi, g), _tile(vc, lo, hi, g), plan.mask(index, q.dtype),
            scale, use_reentrant=False)
    if plan.has_own:
        qo, ko, vo = (_by_kv_head(x, plan.grid_rows, hkv) for x in (q, k_own, v_own))
        own = [_own_attention(qo[:, :, a:b], ko[0, :, a:b], vo[0, :, a:b], visible, scale)
               for a, b, visible in plan.own_blocks]
        out, lse = torch.cat([o for o, _ in own], 2), torch.cat([x for _, x in own], 2)
        own_out = torch.zeros_like(out_h).index_copy(2, plan.own_pos, out.index_select(2, plan.own_slots))
        own_lse = torch.full_like(lse_h, float("-inf")).index_copy(2, plan.own_pos, lse.index_select(2, plan.own_slots))
        out_h = _merge(out_h, lse_h, own_out, own_lse)[0]
    return out_h.permute(2, 1, 0, 3).reshape(m, hq, d).index_select(0, plan.inv)


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
