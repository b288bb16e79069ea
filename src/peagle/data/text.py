"""Stage 2 for base models — plain-text and token-id records → examples of at most ``max_length`` tokens.

No chat template: a TEXT record is tokenized with the tokenizer's special tokens (:func:`encode_text`,
also how ``peagle eval`` tokenizes a ``{"text": ...}`` prompt) and every token is supervised; a TOKENS
record brings its ids and 0/1 loss mask (shape checked by ``peagle.data.records``), and
:func:`check_token_ids` checks its ids against the vocabulary. A sequence longer than ``max_length`` is
split on token boundaries into consecutive examples of ``max_length`` tokens (the last one shorter)
rather than dropped; a piece with nothing supervised after the EAGLE shift (a one-token tail, a stretch
the mask leaves out) is dropped as ``no_supervised_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peagle.data.records import BAD_TOKENS, TEXT, TOKENS, DataError, Record, RecordError
from peagle.data.templates import NO_SUPERVISED, TokenizedExample

__all__ = ["check_token_ids", "encode_text", "split_example", "tokenize_record"]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of raw text with the tokenizer's special tokens (e.g. its bos), no chat template."""
    return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def check_token_ids(rec: Record, vocab_limit: int) -> None:
    """Raise a RecordError (``bad_tokens``) naming ``source:line`` when an id of a TOKENS record lies
    outside ``[0, vocab_limit)`` (the tokenizer's vocabulary, capped by the target's embedding rows)."""
    ids = rec.input_ids or []
    if not ids or (min(ids) >= 0 and max(ids) < vocab_limit):
        return
    i, v = next((i, v) for i, v in enumerate(ids) if not 0 <= v < vocab_limit)
    raise RecordError(f"{rec.source}:{rec.line}: 'input_ids'[{i}] = {v} is not a token id of this tokenizer "
                      f"(0..{vocab_limit - 1})", BAD_TOKENS, rec.source, rec.line)


def split_example(ids: Sequence[int], mask: Sequence[int], max_length: int) -> list[TokenizedExample]:
    """Consecutive pieces of at most ``max_length`` tokens; a piece that supervises nothing after the
    EAGLE shift (no 1 in its mask past position 0) carries the drop reason ``no_supervised_tokens``."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    pieces = []
    for start in range(0, max(len(ids), 1), max_length):
        piece_ids, piece_mask = list(ids[start:start + max_length]), list(mask[start:start + max_length])
        pieces.append(TokenizedExample(piece_ids, piece_mask, None if any(piece_mask[1:]) else NO_SUPERVISED))
    return pieces


def tokenize_record(tokenizer: Any, rec: Record, max_length: int, vocab_limit: int) -> list[TokenizedExample]:
    """The examples of a TEXT record (every token supervised) or a TOKENS record (its own mask, ids
    checked by :func:`check_token_ids`), split at ``max_length`` by :func:`split_example`."""
    if rec.kind == TEXT:
        ids = encode_text(tokenizer, rec.text or "")
        return split_example(ids, [1] * len(ids), max_length)
    if rec.kind == TOKENS:
        check_token_ids(rec, vocab_limit)
        return split_example(rec.input_ids or [], rec.loss_mask or [], max_length)
    raise DataError(f"{rec.source}:{rec.line}: a {rec.kind} record is not text or token ids")
