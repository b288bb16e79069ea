"""Tests for peagle.model.cod: hand-computed cases and property tests over random packed layouts.

Expectations are computed independently of the implementation: counts with exact rational
arithmetic (fractions.Fraction of the decimal ratio), pools and document membership with plain
Python loops over the small layouts.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import full_cod
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peagle.model.cod import assign_segments, chain_table, chains, document_starts, local_chains, sample_cod

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# independent helpers


def expected_count(n_valid: int, d: int, ratio: float, ratio_min: float) -> int:
    """floor(max(0, n_valid - d) * max(r^d, r_min)) in exact decimal arithmetic."""
    r = Fraction(str(ratio))
    r_min = Fraction(str(ratio_min))
    return math.floor(max(0, n_valid - d) * max(r**d, r_min))


def doc_info(doc: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """document id -> (first position, last position)."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, x in enumerate(doc):
        if x >= 0:
            first.setdefault(x, i)
            last[x] = i
    return first, last


def by_depth(anchor: torch.Tensor, depth: torch.Tensor) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for a, d in zip(anchor.tolist(), depth.tolist(), strict=True):
        out.setdefault(d, []).append(a)
    return out


def check_structure(anchor, depth, doc: list[int], loss: list[int] | None, num_depths: int) -> None:
    """Invariants every COD sample must satisfy (sampled or full)."""
    n = len(doc)
    a_list, d_list = anchor.tolist(), depth.tolist()
    assert anchor.dtype == torch.long and depth.dtype == torch.long
    # depth 0 block = arange(n), then blocks in increasing depth
    assert a_list[:n] == list(range(n)) and d_list[:n] == [0] * n
    assert d_list == sorted(d_list)
    assert all(0 <= d < num_depths for d in d_list)
    # within-depth blocks sorted (strictly: no duplicates)
    groups = by_depth(anchor, depth)
    for d, anchors in groups.items():
        assert anchors == sorted(set(anchors)), f"depth {d} block not strictly sorted"
    first, last = doc_info(doc)
    present = set(zip(a_list, d_list, strict=True))
    assert len(present) == len(a_list)
    for a, d in present:
        if d == 0:
            continue
        ref = a + d
        assert a >= 0 and ref < n
        assert doc[a] >= 0, "anchor on padding"
        assert doc[ref] == doc[a], "chain leaves its document"
        assert a >= first[doc[a]] and ref <= last[doc[a]]
        if loss is not None:
            assert loss[ref] == 1, "depth >= 1 reference position not supervised"
        assert (a, d - 1) in present, "chain not prefix-closed"


# --------------------------------------------------------------------------------------------------
# hand-computed cases


def test_hand_counts_single_document():
    # 10 positions, supervised 2..8 -> n_valid = 7; r = 0.5, r_min = 0.2, K = 4
    # m_1 = floor(6 * 0.5) = 3; m_2 = floor(5 * max(0.25, 0.2)) = floor(1.25) = 1;
    # m_3 = floor(4 * max(0.125, 0.2)) = floor(0.8) = 0.
    # pool1 = {2..8} (7 >= 3); pool2 = R1 + 1 within {2..8} has >= 2 members (only 8 -> 9 drops out).
    loss = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0]
    doc = [0] * 10
    for seed in range(5):
        anchor, depth = sample_cod(torch.tensor(loss), torch.tensor(doc), 4, 0.5, 0.2, seed=seed)
        assert torch.bincount(depth).tolist() == [10, 3, 1]
        check_structure(anchor, depth, doc, loss, 4)
        refs1 = [a + 1 for a in by_depth(anchor, depth)[1]]
        assert set(refs1) <= set(range(2, 9))


def test_reference_worked_example_shape():
    # the reference's worked example: L=6, anchors [0..5, 0,1,3,4, 0,3, 0], depths [0]*6+[1]*4+[2,2,3]
    example_anchor = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 3, 4, 0, 3, 0])
    example_depth = torch.tensor([0] * 6 + [1] * 4 + [2, 2, 3])
    check_structure(example_anchor, example_depth, [0] * 6, [1] * 6, 4)
    # all-supervised 6-long doc, r=0.8: m_1 = floor(5*0.8) = 4, m_2 = floor(4*0.64) = 2,
    # m_3 = floor(3*0.512) = 1 -> the same block sizes as the example.
    for seed in range(5):
        anchor, depth = sample_cod(
            torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.long), 4, 0.8, 0.2, seed=seed
        )
        assert torch.bincount(depth).tolist() == [6, 4, 2, 1]
        assert anchor[:6].tolist() == list(range(6))
        check_structure(anchor, depth, [0] * 6, [1] * 6, 4)
        # position 0 is supervised but never a depth-1 reference (no anchor -1: reference §6.1)
        assert int(anchor.min()) >= 0


def test_count_floor_is_robust():
    # 0.7**2 * 100 = 48.99999999999999 in float64; the count must be 49.
    n = 102  # all supervised: n_valid = 102, depth 2: (102 - 2) * 0.49 = 49 exactly
    loss = torch.ones(n, dtype=torch.long)
    anchor, depth = sample_cod(loss, torch.zeros(n, dtype=torch.long), 3, 0.7, 0.2, seed=3)
    counts = torch.bincount(depth).tolist()
    assert counts[1] == math.floor(101 * Fraction(7, 10)) == 70
    assert counts[2] == 49


def test_padding_is_never_supervised_and_k1():
    doc = torch.tensor([-1, -1, 0, 0, 0, -1])
    loss = torch.ones(6, dtype=torch.long)  # loss bits on padding are ignored
    anchor, depth = sample_cod(loss, doc, 3, 1.0, 0.0, seed=0)
    # n_valid = 3; m_1 = 2 = |pool1| = |{3, 4}|; m_2 = floor(1 * 1) = 1, pool2 = {4}
    assert anchor.tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 2]
    assert depth.tolist() == [0] * 6 + [1, 1, 2]
    anchor, depth = sample_cod(loss, doc, 1, 0.7, 0.2)
    assert anchor.tolist() == list(range(6)) and depth.tolist() == [0] * 6


def test_adjacent_documents_chains_stay_inside():
    # two documents with no padding between them, everything supervised, r = 1, r_min = 0:
    # doc 0 (positions 0-2): n_valid = 3, m_1 = 2 = |{1, 2}|, m_2 = 1, pool2 = {2} (3 is doc 1's)
    # doc 1 (positions 3-5): the same, shifted by 3. No seed can change this.
    doc = torch.tensor([0, 0, 0, 1, 1, 1])
    for seed in range(8):
        anchor, depth = sample_cod(torch.ones(6, dtype=torch.long), doc, 3, 1.0, 0.0, seed=seed)
        assert anchor.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 3, 4, 0, 3]
        assert depth.tolist() == [0] * 6 + [1, 1, 1, 1, 2, 2]


def test_full_cod_hand():
    doc = [0, 0, 0, -1, 1, 1]
    anchor, depth = full_cod(torch.tensor(doc), 3)
    assert anchor.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 4, 0]
    assert depth.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
    check_structure(anchor, depth, doc, None, 3)


def test_assign_segments_hand():
    # seq_len 8, S = 3: boundaries at 8/3 and 16/3; bucket 0-2 -> 0, 3-5 -> 1, 6-7 -> 2, 8 -> clamp 2
    anchor = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 4, 5, 7, 2])
    depth = torch.tensor([0] * 8 + [1, 1, 1, 1, 1, 2])
    seg = assign_segments(anchor, depth, 8, 3)
    # depth >= 1 buckets: 2, 3, 5, 6, 8, 3
    assert seg.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 0, 1, 1, 2, 2, 1]
    assert assign_segments(anchor, depth, 8, 1).tolist() == [0] * 14
    with pytest.raises(ValueError):
        assign_segments(anchor, depth, 8, 0)


def test_chain_table_hand():
    anchor = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 3, 4, 0, 3, 0])
    depth = torch.tensor([0] * 6 + [1] * 4 + [2, 2, 3])
    rows = {
        0: [0, 6, 10, 12],
        1: [1, 7, -1, -1],
        2: [2, -1, -1, -1],
        3: [3, 8, 11, -1],
        4: [4, 9, -1, -1],
        5: [5, -1, -1, -1],
    }
    expected = [rows[a] for a in anchor.tolist()]
    assert chain_table(anchor, depth, 4).tolist() == expected
    with pytest.raises(ValueError):
        chain_table(torch.tensor([0, 0]), torch.tensor([0, 0]), 2)


def test_chains_hand():
    # anchors 0..3 at depth 0, then depth 1 of anchors 0, 2, depth 2 of anchor 0 (indices 4, 5, 6)
    anchor = torch.tensor([0, 1, 2, 3, 0, 2, 0])
    depth = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    assert chains(anchor, depth, 3).tolist() == [
        [-1, -1], [-1, -1], [-1, -1], [-1, -1],  # depth 0: no chain
        [4, -1],  # (0, 1) sees itself, not its deeper (0, 2)
        [5, -1],  # (2, 1)
        [4, 6],  # (0, 2): (0, 1) and itself
    ]
    assert chains(anchor[:4], depth[:4], 1).shape == (4, 0)  # K = 1: depth 0 only, no chains
    assert chains(anchor[:0], depth[:0], 3).shape == (0, 2)


def test_local_chains_hand():
    anchor = torch.tensor([0, 1, 2, 3, 0, 2, 0])
    depth = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    chain = chains(anchor, depth, 3)
    elements = torch.tensor([4, 6])  # the chain of anchor 0 run alone
    assert local_chains(chain[elements], elements, 7).tolist() == [[0, -1], [0, 1]]
    elements = torch.tensor([5, 6, 4])  # any order: ids become positions within `elements`
    assert local_chains(chain[elements], elements, 7).tolist() == [[0, -1], [2, 1], [2, -1]]
    elements = torch.tensor([6])  # (0, 1) not in the chunk: it cannot be seen, -1
    assert local_chains(chain[elements], elements, 7).tolist() == [[-1, 0]]
    empty = torch.tensor([], dtype=torch.long)
    assert local_chains(chain[empty], empty, 7).shape == (0, 2)
    with pytest.raises(ValueError):
        local_chains(chain, elements, 7)


def test_document_starts_hand():
    doc = torch.tensor([-1, 0, 0, 0, -1, -1, 5, 5, 2])
    assert document_starts(doc).tolist() == [0, 1, 1, 1, 4, 5, 6, 6, 8]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_depths": 0},
        {"num_depths": 2.0},
        {"ratio": 0.0},
        {"ratio": 1.5},
        {"ratio_min": 1.5},
        {"max_anchors": 0},
        {"document_ids": torch.tensor([0, 0, 1, 0])},  # document 0 not contiguous
        {"document_ids": torch.tensor([0, 0, -2, 1])},
        {"loss_mask": torch.tensor([1, 2, 0, 1])},
        {"loss_mask": torch.ones(3, dtype=torch.long)},
        {"seed": torch.tensor([1, 2, 3, 3])},  # seed not constant within document 0
    ],
)
def test_sample_cod_validation(kwargs):
    args = {
        "loss_mask": torch.ones(4, dtype=torch.long),
        "document_ids": torch.tensor([0, 0, 1, 1]),
        "num_depths": 3,
        "ratio": 0.7,
        "ratio_min": 0.2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        sample_cod(**args)


# --------------------------------------------------------------------------------------------------
# property tests


@st.composite
def layouts(draw, max_docs: int = 4, max_len: int = 24):
    """(document_ids, loss_mask) with padding runs between and after documents."""
    doc: list[int] = []
    loss: list[int] = []
    next_id = draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, max_docs))):
        pad = draw(st.integers(0, 3))
        doc += [-1] * pad
        loss += draw(st.lists(st.integers(0, 1), min_size=pad, max_size=pad))
        length = draw(st.integers(1, max_len))
        doc += [next_id] * length
        loss += draw(st.lists(st.integers(0, 1), min_size=length, max_size=length))
        next_id += draw(st.integers(1, 3))
    pad = draw(st.integers(0, 3))
    doc += [-1] * pad
    loss += [0] * pad
    return doc, loss


cod_params = st.tuples(
    st.integers(1, 6),  # num_depths
    st.sampled_from([0.3, 0.5, 0.7, 0.8, 1.0]),  # ratio
    st.sampled_from([0.0, 0.1, 0.2, 0.5]),  # ratio_min
    st.one_of(st.none(), st.integers(1, 8)),  # max_anchors
    st.integers(-(2**40), 2**40),  # seed
)


@SETTINGS
@given(layout=layouts(), params=cod_params)
def test_sample_cod_properties(layout, params):
    doc, loss = layout
    num_depths, ratio, ratio_min, max_anchors, seed = params
    anchor, depth = sample_cod(
        torch.tensor(loss), torch.tensor(doc), num_depths, ratio, ratio_min, max_anchors, seed
    )
    supervised = [int(x >= 0 and y == 1) for x, y in zip(doc, loss, strict=True)]
    check_structure(anchor, depth, doc, supervised, num_depths)
    first, last = doc_info(doc)
    groups = by_depth(anchor, depth)
    for doc_id, start in first.items():
        members = [p for p in range(start, last[doc_id] + 1) if supervised[p]]
        n_valid = len(members) if max_anchors is None else min(len(members), max_anchors)
        prev_refs: list[int] = []
        for d in range(1, num_depths):
            refs = [a + d for a in groups.get(d, []) if doc[a] == doc_id]
            m_d = expected_count(n_valid, d, ratio, ratio_min)
            assert len(refs) <= m_d
            if d == 1:
                pool_all = [p for p in members if p != start]
                assert set(refs) <= set(pool_all)
                if max_anchors is None:
                    assert len(refs) == min(m_d, len(pool_all))
                else:
                    # S is a random subset of size n_valid; the start may or may not be in it
                    assert len(set(a for a in groups.get(1, []) if doc[a] == doc_id)) <= max_anchors
                    lo = min(m_d, max(n_valid - 1, 0))
                    assert lo <= len(refs) <= min(m_d, n_valid)
            else:
                pool = [p + 1 for p in prev_refs if p + 1 <= last[doc_id] and supervised[p + 1]]
                assert set(refs) <= set(pool)
                assert len(refs) == min(m_d, len(pool))
            prev_refs = refs


@SETTINGS
@given(layout=layouts(), params=cod_params)
def test_sample_cod_deterministic(layout, params):
    doc, loss = layout
    num_depths, ratio, ratio_min, max_anchors, seed = params
    args = (torch.tensor(loss), torch.tensor(doc), num_depths, ratio, ratio_min, max_anchors)
    a1, d1 = sample_cod(*args, seed=seed)
    a2, d2 = sample_cod(*args, seed=seed)
    assert torch.equal(a1, a2) and torch.equal(d1, d2)
    # an int seed and the equivalent per-position seed tensor give the same sample
    a3, d3 = sample_cod(*args, seed=torch.full((len(doc),), seed, dtype=torch.long))
    assert torch.equal(a1, a3) and torch.equal(d1, d3)


def test_different_seeds_differ():
    n = 200
    loss = torch.ones(n, dtype=torch.long)
    doc = torch.zeros(n, dtype=torch.long)
    samples = {tuple(sample_cod(loss, doc, 4, 0.5, 0.2, seed=s)[0].tolist()) for s in range(4)}
    assert len(samples) == 4


def _doc_elements(anchor, depth, lo, hi, offset):
    return sorted(
        (a - offset, d) for a, d in zip(anchor.tolist(), depth.tolist(), strict=True) if lo <= a < hi
    )


@SETTINGS
@given(
    target=layouts(max_docs=1, max_len=30),
    before=layouts(max_docs=2, max_len=12),
    after=layouts(max_docs=2, max_len=12),
    params=cod_params,
    other_seed=st.integers(0, 2**31),
)
def test_packing_independence(target, before, after, params, other_seed):
    num_depths, ratio, ratio_min, max_anchors, seed = params
    t_doc, t_loss = target
    # the target document alone, without its padding: ids 0, int seed
    t_len = sum(1 for x in t_doc if x >= 0)
    t_first = t_doc.index(next(x for x in t_doc if x >= 0))
    t_loss = t_loss[t_first : t_first + t_len]
    alone_a, alone_d = sample_cod(
        torch.tensor(t_loss),
        torch.zeros(t_len, dtype=torch.long),
        num_depths,
        ratio,
        ratio_min,
        max_anchors,
        seed,
    )
    alone = _doc_elements(alone_a, alone_d, 0, t_len, 0)

    # packed: other documents before and after (ids shifted so all are unique), per-position seeds
    b_doc, b_loss = before
    f_doc, f_loss = after
    big = 1000
    doc = (
        [x if x < 0 else x + big for x in b_doc] + [7] * t_len + [x if x < 0 else x + 2 * big for x in f_doc]
    )
    loss = b_loss + t_loss + f_loss
    offset = len(b_doc)
    seeds = [seed if i in range(offset, offset + t_len) else other_seed + (x % 17) for i, x in enumerate(doc)]
    packed_a, packed_d = sample_cod(
        torch.tensor(loss), torch.tensor(doc), num_depths, ratio, ratio_min, max_anchors, torch.tensor(seeds)
    )
    assert _doc_elements(packed_a, packed_d, offset, offset + t_len, offset) == alone


@SETTINGS
@given(layout=layouts(max_len=40), max_anchors=st.integers(1, 5), seed=st.integers(0, 1000))
def test_max_anchors_caps_chain_starts(layout, max_anchors, seed):
    doc, loss = layout
    anchor, depth = sample_cod(torch.tensor(loss), torch.tensor(doc), 4, 1.0, 1.0, max_anchors, seed)
    first, _ = doc_info(doc)
    groups = by_depth(anchor, depth)
    for doc_id in first:
        anchors1 = {a for a in groups.get(1, []) if doc[a] == doc_id}
        assert len(anchors1) <= max_anchors
        # every deeper chain starts at one of the depth-1 anchors (prefix closure within the cap)
        for d in range(2, 4):
            assert {a for a in groups.get(d, []) if doc[a] == doc_id} <= anchors1


@SETTINGS
@given(layout=layouts(), num_depths=st.integers(1, 6))
def test_full_cod_properties(layout, num_depths):
    doc, _ = layout
    anchor, depth = full_cod(torch.tensor(doc), num_depths)
    check_structure(anchor, depth, doc, None, num_depths)
    first, last = doc_info(doc)
    expected = {
        (a, d) for a in range(len(doc)) for d in range(1, num_depths) if doc[a] >= 0 and a + d <= last[doc[a]]
    }
    got = {(a, d) for a, d in zip(anchor.tolist(), depth.tolist(), strict=True) if d > 0}
    assert got == expected


@SETTINGS
@given(layout=layouts(), params=cod_params)
def test_chain_table_matches_elements(layout, params):
    doc, loss = layout
    num_depths, ratio, ratio_min, max_anchors, seed = params
    anchor, depth = sample_cod(
        torch.tensor(loss), torch.tensor(doc), num_depths, ratio, ratio_min, max_anchors, seed
    )
    table = chain_table(anchor, depth, num_depths)
    assert table.shape == (anchor.numel(), num_depths)
    index = {(a, d): i for i, (a, d) in enumerate(zip(anchor.tolist(), depth.tolist(), strict=True))}
    for m, a in enumerate(anchor.tolist()):
        assert table[m].tolist() == [index.get((a, j), -1) for j in range(num_depths)]


@SETTINGS
@given(layout=layouts())
def test_document_starts_properties(layout):
    doc, _ = layout
    starts = document_starts(torch.tensor(doc)).tolist()
    first, _ = doc_info(doc)
    assert starts == [first[x] if x >= 0 else i for i, x in enumerate(doc)]


@SETTINGS
@given(
    seq_len=st.integers(1, 40),
    num_segments=st.integers(1, 6),
    data=st.data(),
)
def test_assign_segments_properties(seq_len, num_segments, data):
    anchor = data.draw(st.lists(st.integers(0, seq_len - 1), min_size=1, max_size=20))
    depth = data.draw(st.lists(st.integers(0, 4), min_size=len(anchor), max_size=len(anchor)))
    seg = assign_segments(torch.tensor(anchor), torch.tensor(depth), seq_len, num_segments).tolist()
    for a, d, s in zip(anchor, depth, seg, strict=True):
        bucket = a + (1 if d > 0 else 0)
        # segment s covers buckets in [s * seq_len / S, (s + 1) * seq_len / S), last one clamps
        assert 0 <= s < num_segments
        assert Fraction(s * seq_len, num_segments) <= bucket
        if s < num_segments - 1:
            assert bucket < Fraction((s + 1) * seq_len, num_segments)
