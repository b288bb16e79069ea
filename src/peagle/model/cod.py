"""COD (conditional drop-token, PARD: An et al., arXiv 2504.18583) sampling and sequence partitioning
(P-EAGLE's Algorithm 1: Hui et al., arXiv 2602.01469) of the flat element list.

Pure tensor functions over the *flat element list* (docs/conventions.md, docs/internals.md): a batch of B rows
of n EAGLE-shifted positions is flattened to N positions, document ids are unique across the whole
list (``-1`` = padding) and each document is one contiguous run. A COD sample is a pair of
LongTensors ``(anchor[M], depth[M])``: the first N elements are depth 0 (element i = position i),
then the depth-1 block sorted by anchor, then depth 2, and so on. The reference position of an
element (the position whose target distribution supervises it) is ``anchor + depth``.

Sampling, segment assignment and chain tables share one file because they share the element-list
invariants they check.

Two properties the samplers of speculators and NeMo AutoModel lack (docs/conventions.md, "COD"):

- no chain ever leaves its document, and no anchor is negative or precedes its document's start
  (the depth-1 pool excludes each document's first position, deeper pools require ``p + 1`` to stay
  in the document);
- randomness is counter-based: every random key is a hash of (document seed, position within the
  document, depth, stream), so a document samples exactly the same alone or packed at any offset,
  in any batch, on any rank.

Everything is vectorised over positions and documents; the only Python loop is over the K depths.
"""

from __future__ import annotations

import numbers

import torch

from peagle.config.limits import check_limit

__all__ = [
    "assign_segments",
    "chain_table",
    "chains",
    "document_starts",
    "local_chains",
    "sample_cod",
]

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one of them stays below 2**63, so every product
# is exact in int64 (no signed overflow) before it is reduced to 32 bits.
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_SEED_SALT = 0x2545F491
# Stream tags separate the independent draws made for the same (document, position).
_STREAM_DEPTH = 0  # the depth-d subsample
_STREAM_ANCHORS = 1  # the max_anchors cap on chain starts
# Added before flooring the per-depth counts. float64 rounding can land just below an exact integer
# (0.7**2 * 100 = 48.99999999999999) and the count would come out one short; the rounding error is
# ~1e-16 relative (< 1e-9 absolute for any realistic length), while for a one-decimal ratio such as
# 0.7 a non-integer exact count is a multiple of 10**-d, i.e. >= 1e-8 below the next integer for
# d <= 8. (Ratios with many decimals at deep depths could in principle round up spuriously.)
_FLOOR_EPS = 1e-9


# --------------------------------------------------------------------------------------------------
# validation and document layout helpers


def _check_1d_int(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _run_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool[N]: True where a new run of equal document ids begins."""
    flags = torch.ones_like(document_ids, dtype=torch.bool)
    if document_ids.numel() > 1:
        flags[1:] = document_ids[1:] != document_ids[:-1]
    return flags


def _check_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Validate document ids (integer, 1-D, ``>= -1``, each document one run); return run-start flags."""
    _check_1d_int("document_ids", document_ids)
    if document_ids.numel() and bool((document_ids < -1).any()):
        raise ValueError("document_ids must be >= -1 (-1 marks padding)")
    flags = _run_starts(document_ids)
    run_ids = document_ids[flags]
    run_ids = run_ids[run_ids >= 0]
    if torch.unique(run_ids).numel() != run_ids.numel():
        raise ValueError("each document must be one contiguous run of positions in document_ids")
    return flags


def _starts_from_flags(flags: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(flags.numel(), device=flags.device)
    marked = torch.where(flags, positions, torch.zeros_like(positions))
    return torch.cummax(marked, dim=0).values


def _ends_from_flags(flags: torch.Tensor) -> torch.Tensor:
    """Last position of each position's run (run ends are the positions before the next run start)."""
    n = flags.numel()
    ends_flag = torch.ones_like(flags)
    if n > 1:
        ends_flag[:-1] = flags[1:]
    positions = torch.arange(n, device=flags.device)
    marked = torch.where(ends_flag, positions, torch.full_like(positions, n))
    # reverse cumulative minimum
    return torch.flip(torch.cummin(torch.flip(marked, [0]), dim=0).values, [0])


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """First position of each position's document run (padding positions: the position itself).

    Used to turn flat positions into positions within a document (default position ids, the
    counter of the COD hash) and as the left edge of each query's depth-0 attention range.
    """
    flags = _check_document_ids(document_ids)
    starts = _starts_from_flags(flags)
    positions = torch.arange(document_ids.numel(), device=document_ids.device)
    return torch.where(document_ids >= 0, starts, positions)


# --------------------------------------------------------------------------------------------------
# counter-based randomness


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer finaliser (xorshift-multiply) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    x = x ^ (x >> 15)
    return x


def _hash_prefix(seed: torch.Tensor, pos_in_doc: torch.Tensor) -> torch.Tensor:
    """The (document seed, position within document) part of the key hash, computed once per position.

    Only the low 64 bits of the seed are used.
    """
    h = _mix32((seed & _M32) ^ _SEED_SALT)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (pos_in_doc & _M32))
    return _mix32(h ^ ((pos_in_doc >> 32) & _M32))


def _hash_keys(prefix: torch.Tensor, depth: int, stream: int) -> torch.Tensor:
    """32-bit random keys (int64) = hash(document seed, position within document, depth, stream).

    Keys depend on nothing else, which is what makes sampling independent of packing, batch
    composition and world size.
    """
    return _mix32(prefix ^ ((depth & 0xFFFF) | (stream << 16)))


def _select_smallest_keys(
    candidates: torch.Tensor,
    run_index: torch.Tensor,
    prefix: torch.Tensor,
    depth: int,
    stream: int,
    quota: torch.Tensor,
    num_runs: int,
) -> torch.Tensor:
    """Bool[N]: per run, the ``quota[run]`` candidates with the smallest keys (all if fewer).

    Taking the smallest i.i.d. uniform keys is uniform sampling without replacement. Ties (32-bit
    keys can collide) are broken by flat position, which within a document is position order, so
    the choice stays independent of packing. Keys are hashed for the candidates only.
    """
    chosen = torch.zeros_like(candidates)
    idx = candidates.nonzero().squeeze(1)
    if idx.numel() == 0:
        return chosen
    runs = run_index[idx]
    keys = _hash_keys(prefix[idx], depth, stream)
    composite = runs * (1 << 32) + keys  # run-major, then key; keys < 2**32, runs < N
    order = torch.sort(composite, stable=True).indices
    runs_sorted = runs[order]
    counts = torch.bincount(runs, minlength=num_runs)
    group_first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(idx.numel(), device=idx.device) - group_first[runs_sorted]
    keep = rank < quota[runs_sorted]
    chosen[idx[order[keep]]] = True
    return chosen


# --------------------------------------------------------------------------------------------------
# COD sampling


def _depth_counts(n_valid: torch.Tensor, d: int, ratio: float, ratio_min: float) -> torch.Tensor:
    """m_d = floor(max(0, n_valid - d) * max(r^d, r_min)) per run, robust to float64 rounding."""
    factor = max(ratio**d, ratio_min)
    base = (n_valid.to(torch.float64) - d).clamp(min=0.0)
    return torch.floor(base * factor + _FLOOR_EPS).to(torch.long)


def _seed_tensor(seed: int | torch.Tensor, document_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    n = document_ids.numel()
    if _is_int(seed):
        lo = int(seed) & ((1 << 64) - 1)
        if lo >= 1 << 63:  # keep the low 64 bits as a two's-complement int64
            lo -= 1 << 64
        return torch.full((n,), lo, dtype=torch.long, device=document_ids.device)
    if not isinstance(seed, torch.Tensor):
        raise ValueError(f"seed must be an int or a LongTensor[N], got {type(seed).__name__}")
    _check_1d_int("seed", seed)
    if seed.numel() != n:
        raise ValueError(f"seed has {seed.numel()} entries, document_ids has {n}")
    seed = seed.to(device=document_ids.device, dtype=torch.long)
    real = document_ids >= 0
    if bool((seed[real] != seed[starts[real]]).any()):
        raise ValueError("a seed tensor must hold one constant seed per document")
    return seed


def _check_sampling_args(
    loss_mask: torch.Tensor,
    document_ids: torch.Tensor,
    num_depths: int,
    ratio: float,
    ratio_min: float,
    max_anchors: int | None,
) -> None:
    for name, value in (("num_depths", num_depths), ("ratio", ratio), ("ratio_min", ratio_min),
                        ("max_anchors", max_anchors)):
        check_limit(name, value)
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.dim() != 1:
        raise ValueError("loss_mask must be a 1-D tensor")
    if loss_mask.shape != document_ids.shape:
        raise ValueError(
            f"loss_mask and document_ids must have the same shape, got {tuple(loss_mask.shape)} "
            f"and {tuple(document_ids.shape)}"
        )
    if (
        loss_mask.dtype != torch.bool
        and loss_mask.numel()
        and not bool(((loss_mask == 0) | (loss_mask == 1)).all())
    ):
        raise ValueError("loss_mask must be bool or hold only 0/1 values")


def sample_cod(
    loss_mask: torch.Tensor,
    document_ids: torch.Tensor,
    num_depths: int,
    ratio: float,
    ratio_min: float,
    max_anchors: int | None = None,
    seed: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the COD elements ``(anchor[M], depth[M])`` of a flat, packed batch.

    Depth 0 keeps every position (element i = position i, padding included) as context. For each
    document and depth d = 1..num_depths-1, ``m_d = floor(max(0, n_valid - d) * max(r^d, r_min))``
    reference positions are drawn uniformly without replacement from the pool, where
    ``n_valid = |S|`` and S (the chain starts) is the document's supervised positions, or a random
    ``max_anchors`` of them when it has more. ``pool(1) = S`` minus the document's first position;
    ``pool(d+1) = {p + 1 : p drawn at depth d}`` restricted to supervised positions of the same
    document. A smaller pool is taken whole. A depth-d element with reference position p has
    anchor ``p - d``, so chains are prefix-closed, never leave their document and never start
    before it. Padding (``document_ids == -1``) is never supervised, whatever ``loss_mask`` says.

    Args:
        loss_mask: Bool or 0/1 tensor [N], 1 = supervised position.
        document_ids: LongTensor [N], unique across the flat list, -1 = padding, one run each.
        num_depths: K >= 1 (depths 0..K-1).
        ratio: r in (0, 1]; ratio_min: r_min in [0, 1].
        max_anchors: optional cap on the chain starts of each document.
        seed: an int shared by every document, or a LongTensor [N] holding each position's
            document seed. Keys are a hash of (document seed, position within document, depth), so
            a document samples the same alone or packed anywhere.

    Returns:
        ``(anchor, depth)`` LongTensors; depth 0 block first, then each depth sorted by anchor.
    """
    _check_1d_int("document_ids", document_ids)
    _check_sampling_args(loss_mask, document_ids, num_depths, ratio, ratio_min, max_anchors)
    flags = _check_document_ids(document_ids)
    device = document_ids.device
    n = document_ids.numel()
    positions = torch.arange(n, device=device)
    anchors = [positions]
    depths = [torch.zeros(n, dtype=torch.long, device=device)]
    if n == 0 or num_depths == 1:
        return positions, depths[0]

    real = document_ids >= 0
    starts = torch.where(real, _starts_from_flags(flags), positions)
    pos_in_doc = positions - starts
    prefix = _hash_prefix(_seed_tensor(seed, document_ids, starts), pos_in_doc)
    run_index = torch.cumsum(flags.to(torch.long), 0) - 1
    num_runs = int(run_index[-1].item()) + 1

    supervised = loss_mask.to(device=device) != 0
    supervised = supervised & real
    # continues[i]: position i belongs to the same document as position i - 1
    continues = real & ~flags

    chain_starts = supervised
    if max_anchors is not None:
        quota = torch.full((num_runs,), max_anchors, dtype=torch.long, device=device)
        chain_starts = _select_smallest_keys(
            supervised, run_index, prefix, 0, _STREAM_ANCHORS, quota, num_runs
        )
    n_valid = torch.bincount(run_index[chain_starts], minlength=num_runs)

    pool = chain_starts & continues  # drop each document's first position: anchor p - 1 >= start
    for d in range(1, num_depths):
        if not bool(pool.any()):
            break
        quota = _depth_counts(n_valid, d, ratio, ratio_min)
        chosen = _select_smallest_keys(pool, run_index, prefix, d, _STREAM_DEPTH, quota, num_runs)
        refs = chosen.nonzero().squeeze(1)
        if refs.numel() == 0:
            break
        anchors.append(refs - d)
        depths.append(torch.full_like(refs, d))
        pool = torch.zeros_like(pool)
        pool[1:] = chosen[:-1]
        pool &= supervised & continues
    return torch.cat(anchors), torch.cat(depths)




# --------------------------------------------------------------------------------------------------
# Algorithm 1 and chains


def _check_elements(anchor: torch.Tensor, depth: torch.Tensor) -> None:
    """anchor and depth: 1-D integer tensors of the same shape (one entry per COD element)."""
    _check_1d_int("anchor", anchor)
    _check_1d_int("depth", depth)
    if anchor.shape != depth.shape:
        raise ValueError(
            f"anchor and depth must have the same shape, got {tuple(anchor.shape)} and {tuple(depth.shape)}"
        )


def assign_segments(
    anchor: torch.Tensor, depth: torch.Tensor, seq_len: int, num_segments: int
) -> torch.Tensor:
    """Segment index of each element for Algorithm-1 sequence partitioning (closed form).

    Anchors are row-local (0..seq_len-1). A depth-0 element is bucketed by its anchor, a deeper one
    by anchor + 1 (the position of its chain's depth-1 element, which every deeper element of the
    chain follows), with boundaries at multiples of seq_len / S:
    ``seg = min(bucket * S // seq_len, S - 1)``.
    """
    if not _is_int(num_segments) or num_segments < 1:
        raise ValueError(f"num_segments must be an int >= 1, got {num_segments!r}")
    if not _is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    _check_elements(anchor, depth)
    bucket = anchor.to(torch.long) + (depth > 0).to(torch.long)
    return torch.clamp(bucket * num_segments // seq_len, max=num_segments - 1)


def chain_table(anchor: torch.Tensor, depth: torch.Tensor, num_depths: int) -> torch.Tensor:
    """LongTensor [M, K]: entry [m, j] is the index of the element (anchor[m], j), -1 if absent.

    Lets a query gather its own chain (the elements it attends besides the depth-0 stream) and
    lets tests check prefix-closure. Built by sort + searchsorted on the key anchor * K + depth.
    """
    check_limit("num_depths", num_depths)
    _check_elements(anchor, depth)
    m = anchor.numel()
    if m == 0:
        return torch.empty((0, num_depths), dtype=torch.long, device=anchor.device)
    anchor = anchor.to(torch.long)
    depth = depth.to(torch.long)
    if bool((anchor < 0).any()) or bool((depth < 0).any()) or bool((depth >= num_depths).any()):
        raise ValueError("chain_table needs anchor >= 0 and 0 <= depth < num_depths")
    keys = anchor * num_depths + depth
    sorted_keys, order = torch.sort(keys)
    if m > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise ValueError("duplicate (anchor, depth) elements")
    js = torch.arange(num_depths, device=anchor.device)
    queries = anchor[:, None] * num_depths + js[None, :]
    loc = torch.searchsorted(sorted_keys, queries).clamp(max=m - 1)
    found = sorted_keys[loc] == queries
    return torch.where(found, order[loc], torch.full_like(loc, -1))


def chains(anchor: torch.Tensor, depth: torch.Tensor, num_depths: int) -> torch.Tensor:
    """LongTensor [M, K-1]: each element's own chain, the keys it attends besides the depth-0 stream.

    Column j - 1 holds the index of the element (anchor[m], j) for 1 <= j <= depth[m] and -1 beyond
    the element's own depth (a query never sees its chain's deeper slots): ``chain_table(...)[:, 1:]``
    masked by ``j <= depth``. A depth-0 element's row is all -1.
    """
    table = chain_table(anchor, depth, num_depths)[:, 1:]
    cols = torch.arange(1, num_depths, device=table.device)
    return torch.where(cols[None, :] <= depth.to(torch.long)[:, None], table, -1)


def local_chains(chain: torch.Tensor, elements: torch.Tensor, num_elements: int) -> torch.Tensor:
    """The chains of ``elements`` re-indexed to positions within ``elements`` ([len(elements), K-1]).

    ``chain`` = ``chains(...)[elements]`` (global element ids, -1 = none); ``num_elements`` = M, the
    number of global ids. Entry e becomes i where ``elements[i] == e``; -1 stays -1, and so does an id
    that is not in ``elements`` (a chunk run alone must hold whole chains for its queries to see them).
    """
    _check_1d_int("elements", elements)
    if chain.dim() != 2 or chain.shape[0] != elements.numel():
        raise ValueError(f"chain must be [len(elements)={elements.numel()}, K-1], got {tuple(chain.shape)}")
    local = torch.full((int(num_elements),), -1, dtype=torch.long, device=elements.device)
    local[elements] = torch.arange(elements.numel(), device=elements.device)
    if local.numel() == 0:
        return torch.full_like(chain, -1, dtype=torch.long)
    return torch.where(chain >= 0, local[chain.clamp(min=0)], -1)
