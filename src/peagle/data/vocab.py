"""Draft vocabulary (d2t offsets, t2d mask) and the choice/check of ``mask_token_id``.

The draft vocab (docs/conventions.md, "Checkpoint format") is the N most frequent supervised
(assistant) target tokens, ties by lower id, padded with the lowest unused ids, sorted ascending; ``d2t`` stores OFFSETS
(target_id = draft_id + d2t[draft_id]); ``t2d`` is a bool mask over the target vocab.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from peagle.config.limits import validate_mask_token_id


@dataclass
class DraftVocab:
    """draft_ids: target id of each draft id (ascending); d2t = draft_ids − arange(Vd)."""

    draft_ids: Tensor  # int64 [Vd]
    d2t: Tensor  # int64 [Vd]
    t2d: Tensor  # bool [V]
    coverage: float  # fraction of supervised target tokens inside the draft vocab

    @property
    def size(self) -> int:
        return int(self.draft_ids.numel())

    @property
    def is_identity(self) -> bool:
        return self.size == self.t2d.numel()

    def to_target(self, draft_ids: Tensor) -> Tensor:
        """Map draft ids to target ids (what vLLM does with d2t)."""
        return draft_ids + self.d2t.to(draft_ids.device)[draft_ids]


def build_draft_vocab(token_counts: Tensor, draft_vocab_size: int) -> DraftVocab:
    """The ``draft_vocab_size`` most frequent tokens of ``token_counts`` [V] (supervised counts).

    Ties are broken by lower id; when fewer tokens have nonzero counts, the lowest unused ids fill
    the rest. N == V gives the identity mapping (d2t zeros, t2d all True).
    """
    counts = torch.as_tensor(token_counts).reshape(-1).to(torch.int64).cpu()
    V = counts.numel()
    N = int(draft_vocab_size)
    if not 1 <= N <= V:
        raise ValueError(f"draft_vocab_size must be in [1, {V}] (the target vocab size), got {N}")
    total = int(counts.sum())
    if N == V:
        return DraftVocab(torch.arange(V), torch.zeros(V, dtype=torch.int64), torch.ones(V, dtype=torch.bool),
                          1.0)
    # Stable sort by descending count keeps ids ascending within equal counts; zero-count tokens
    # (sorted by id) come last, so the padding is the lowest unused ids.
    order = torch.sort(-counts, stable=True).indices
    chosen = torch.sort(order[:N]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[chosen] = True
    coverage = float(counts[chosen].sum()) / total if total else 0.0
    return DraftVocab(chosen, chosen - torch.arange(N), t2d, coverage)


def check_mask_token(mask_token_id: int, vocab_size: int, token_counts_all: Tensor | None = None) -> int:
    """Refuse a mask token id outside [0, vocab_size) (`mask_token.validate_mask_token_id`) or one found in the data."""
    mid = validate_mask_token_id(int(mask_token_id), vocab_size)
    if token_counts_all is not None:
        counts = torch.as_tensor(token_counts_all).reshape(-1)
        n = int(counts[mid]) if mid < counts.numel() else 0
        if n > 0:
            raise ValueError(f"mask_token_id {mid} occurs {n} times in the prepared data; pick an id the "
                             "tokenizer never produces (--mask-token-id N, or mask_token_id: auto)")
    return mid


def _reserved_special_ids(tokenizer: Any) -> Iterable[int]:
    """Ids of added/special tokens whose text says reserved or unused, ascending."""
    found: dict[int, str] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, tok in decoder.items():
        found[int(i)] = str(getattr(tok, "content", tok))
    for name in getattr(tokenizer, "all_special_tokens", []) or []:
        i = tokenizer.convert_tokens_to_ids(name)
        if isinstance(i, int):
            found.setdefault(i, name)
    for i in sorted(found):
        text = found[i].lower()
        if "reserved" in text or "unused" in text:
            yield i


def choose_mask_token_id(
    tokenizer: Any,
    vocab_size: int,
    requested: int | str = "auto",
    token_counts_all: Tensor | None = None,
) -> int:
    """The draft's ``mask_token_id``: explicit (checked) or ``"auto"``.

    auto: the first embedding row the tokenizer never produces (len(tokenizer) ≤ id < vocab_size);
    else the lowest reserved/unused special token that never occurs in the data; else an error
    explaining how to choose one. Never falls back to pad/eos/unk (a bug of other P-EAGLE trainers:
    the mask embedding would then be shared with a real token).
    """
    if requested != "auto":
        try:
            mid = int(requested)
        except (TypeError, ValueError):
            raise ValueError(f"mask_token_id must be an integer or 'auto', got {requested!r}") from None
        return check_mask_token(mid, vocab_size, token_counts_all)
    n_tok = len(tokenizer)
    if n_tok < vocab_size:
        return n_tok
    counts = None if token_counts_all is None else torch.as_tensor(token_counts_all).reshape(-1)
    for i in _reserved_special_ids(tokenizer):
        if i < vocab_size and (counts is None or i >= counts.numel() or int(counts[i]) == 0):
            return i
    raise ValueError(
        f"no free mask token: the tokenizer uses all {vocab_size} embedding rows and has no unused "
        "reserved special token; pass --mask-token-id N with a token id that never occurs in the data, "
        "or resize the target's embeddings to add a spare row"
    )
