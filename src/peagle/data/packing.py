"""Stage 4 — packing: examples into rows of ``max_length`` tokens, and the COD seeds of their documents.

:func:`pack` places examples first-fit (deterministic, optionally in a seeded permutation);
:func:`collate` assembles the rows with per-row document ids, example indices and positions within
each document (:class:`PackedRows`, unshifted). :func:`cod_seeds` gives every position its document's
COD seed from (run seed, epoch, example index), so COD sampling does not depend on packing or ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor


class _MaxTree:
    """Segment tree over row capacities: leftmost row with capacity >= need, in O(log rows)."""

    def __init__(self, size: int) -> None:
        n = 1
        while n < max(size, 1):
            n *= 2
        self.n = n
        self.t = [-1] * (2 * n)

    def set(self, i: int, v: int) -> None:
        i += self.n
        self.t[i] = v
        i //= 2
        while i:
            self.t[i] = max(self.t[2 * i], self.t[2 * i + 1])
            i //= 2

    def leftmost(self, need: int) -> int:
        if self.t[1] < need:
            return -1
        i = 1
        while i < self.n:
            i = 2 * i if self.t[2 * i] >= need else 2 * i + 1
        return i - self.n


def pack(lengths: Sequence[int], max_length: int, seed: int | None = None) -> list[list[int]]:
    """Greedy first-fit packing of examples into rows of at most ``max_length`` tokens.

    Examples are visited in index order (or in a permutation drawn from ``seed``) and each goes to
    the first row with room; returns each row's example indices in placement order. Deterministic.
    """
    n = len(lengths)
    order: Sequence[int] = range(n)
    if seed is not None:
        g = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=g).tolist()
    tree = _MaxTree(n)
    rows: list[list[int]] = []
    cap: list[int] = []
    for i in order:
        L = int(lengths[i])
        if L > max_length or L <= 0:
            raise ValueError(f"example {i} has length {L}, outside [1, {max_length}]")
        r = tree.leftmost(L)
        if r < 0:
            r = len(rows)
            rows.append([])
            cap.append(max_length)
        rows[r].append(i)
        cap[r] -= L
        tree.set(r, cap[r])
    return rows


@dataclass
class PackedRows:
    """B packed rows (unshifted): documents are contiguous runs, padding at the end of rows.

    document_ids: 0..k−1 within a row, −1 padding; example_index: each position's example (−1
    padding); position_ids: position within the document (0 for padding).
    """

    input_ids: Tensor  # int64 [B, n]
    loss_mask: Tensor  # bool [B, n]
    document_ids: Tensor  # int64 [B, n]
    example_index: Tensor  # int64 [B, n]
    position_ids: Tensor  # int64 [B, n]

    def to(self, device: torch.device | str) -> PackedRows:
        """The same rows on ``device``."""
        return PackedRows(*(getattr(self, k).to(device) for k in
                            ("input_ids", "loss_mask", "document_ids", "example_index", "position_ids")))


def _field(ex: Any, key: str) -> Any:
    return ex[key] if isinstance(ex, Mapping) else getattr(ex, key)


def collate(
    examples: Any, rows: Sequence[Sequence[int]], max_length: int, pad_token_id: int = 0
) -> PackedRows:
    """Assemble packed rows of ``max_length`` from ``examples[i]`` (mapping or object with
    input_ids / loss_mask) for the example indices of each row (as returned by ``pack``)."""
    B = len(rows)
    ids = torch.full((B, max_length), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((B, max_length), dtype=torch.bool)
    docs = torch.full((B, max_length), -1, dtype=torch.int64)
    exi = torch.full((B, max_length), -1, dtype=torch.int64)
    pos = torch.zeros((B, max_length), dtype=torch.int64)
    for b, row in enumerate(rows):  # one tensor per field and row (not per example: ~70 examples a row)
        exs = [examples[int(i)] for i in row]
        tokens, masks = [_field(ex, "input_ids") for ex in exs], [_field(ex, "loss_mask") for ex in exs]
        lengths = torch.tensor([len(t) for t in tokens], dtype=torch.int64)
        n = int(lengths.sum())
        if n > max_length:
            raise ValueError(f"row {b} overflows max_length {max_length}")
        ids[b, :n] = torch.tensor(list(chain.from_iterable(tokens)), dtype=torch.int64)
        mask[b, :n] = torch.tensor(list(chain.from_iterable(masks))).bool()
        docs[b, :n] = torch.arange(len(row)).repeat_interleave(lengths)
        exi[b, :n] = torch.tensor([int(i) for i in row], dtype=torch.int64).repeat_interleave(lengths)
        pos[b, :n] = torch.arange(n) - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
    return PackedRows(ids, mask, docs, exi, pos)


def positions_in_document(document_ids: Tensor) -> Tensor:
    """Position of each element within its (contiguous) document run; 0 for padding (−1)."""
    flat = document_ids.reshape(-1, document_ids.shape[-1]) if document_ids.dim() > 1 else document_ids[None]
    n = flat.shape[-1]
    idx = torch.arange(n, device=flat.device).expand_as(flat)
    new_run = torch.ones_like(flat, dtype=torch.bool)
    new_run[:, 1:] = flat[:, 1:] != flat[:, :-1]
    start = torch.where(new_run, idx, torch.zeros_like(idx))
    start = torch.cummax(start, dim=-1).values
    pos = torch.where(flat >= 0, idx - start, torch.zeros_like(idx))
    return pos.reshape(document_ids.shape)


def cod_seed(run_seed: int, epoch: int, example_index: int) -> int:
    """Stable per-document COD seed from (run seed, epoch, example index); in [0, 2**63)."""
    h = hashlib.blake2b(f"{int(run_seed)}/{int(epoch)}/{int(example_index)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def cod_seeds(example_index: Tensor, run_seed: int, epoch: int) -> Tensor:
    """Per-position seeds (``Batch.cod_seeds``) from a per-position example index (−1 → 0)."""
    uniq, inverse = torch.unique(example_index.cpu(), return_inverse=True)
    table = torch.tensor([cod_seed(run_seed, epoch, u) if u >= 0 else 0 for u in uniq.tolist()],
                         dtype=torch.int64)
    return table[inverse].to(example_index.device)
