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


@dataclass(frozen=True)
class MaskChoice:
    """The draft's mask token and why it was chosen (``prepare`` prints it; the manifest records both)."""

    token_id: int
    reason: str


def _template_ids(tokenizer: Any) -> set[int]:
    """Ids the chat template itself writes (a system prompt, turns, the generation prompt): a mask token
    must not be one of them even when the prepared data happens not to contain it. Empty without a template."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]
    ids: set[int] = set()
    for msgs in (messages, messages[1:]):
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # no template, or one that refuses this shape: it writes nothing we can know
            continue
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def _describe(tokenizer: Any, i: int) -> str:
    return f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i})"


def choose_mask_token(
    tokenizer: Any,
    vocab_size: int,
    requested: int | str = "auto",
    token_counts_all: Tensor | None = None,
) -> MaskChoice:
    """The draft's ``mask_token_id``: explicit (checked) or ``"auto"``, with the reason.

    auto, in order: the first embedding row the tokenizer never produces (len(tokenizer) ≤ id <
    vocab_size); the lowest reserved/unused special token absent from the data; the lowest added/special
    token absent from the data that is not bos/eos/pad/unk and that the chat template never writes
    (full vocabularies: SmolLM2, Llama-3 without reserved rows); the lowest-id token absent from the data
    (and not written by the template). Never pad/eos/unk (a bug of other P-EAGLE trainers: the mask
    embedding would then be shared with a real token). The data's counts are needed past the first rule.
    """
    if requested != "auto":
        try:
            mid = int(requested)
        except (TypeError, ValueError):
            raise ValueError(f"mask_token_id must be an integer or 'auto', got {requested!r}") from None
        return MaskChoice(check_mask_token(mid, vocab_size, token_counts_all), "given (--mask-token-id)")
    n_tok = len(tokenizer)
    if n_tok < vocab_size:
        return MaskChoice(n_tok, f"the first spare embedding row: the tokenizer has {n_tok} tokens, the target "
                                 f"{vocab_size} rows")
    counts = None if token_counts_all is None else torch.as_tensor(token_counts_all).reshape(-1)

    def unused(i: int) -> bool:
        return i < vocab_size and (counts is None or i >= counts.numel() or int(counts[i]) == 0)

    for i in _reserved_special_ids(tokenizer):
        if unused(i):
            return MaskChoice(i, f"reserved special token {_describe(tokenizer, i)}, absent from the data")
    if counts is None:
        raise ValueError(f"no free mask token: the tokenizer uses all {vocab_size} embedding rows and has no "
                         "unused reserved special token; pass --mask-token-id N with an id that never occurs "
                         "in the data")
    roles = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id")
    taboo = {i for i in (getattr(tokenizer, r, None) for r in roles) if isinstance(i, int)}
    taboo |= _template_ids(tokenizer)
    added = sorted(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    for i in added:
        if unused(i) and i not in taboo:
            return MaskChoice(i, f"added special token {_describe(tokenizer, i)}: absent from the data, not "
                                 "bos/eos/pad/unk, never written by the chat template")
    free = ((counts[:vocab_size] == 0).nonzero().squeeze(1)).tolist() + list(range(counts.numel(), vocab_size))
    for i in free:
        if i not in taboo:
            return MaskChoice(i, f"token {_describe(tokenizer, i)}, the lowest id absent from the data (no spare "
                                 "embedding row and no unused special token)")
    raise ValueError(f"no free mask token: every one of the {vocab_size} token ids occurs in the data or is "
                     "written by the chat template; resize the target's embeddings to add a spare row")
