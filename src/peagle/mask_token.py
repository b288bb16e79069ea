"""The mask token id: its one check, without torch, so the config loader can use it at start-up.

Deep COD elements (mask slots) carry ``mask_token_id``; the draft's `DraftConfig` holds it and vLLM reads
it from the exported config (docs/conventions.md, "Flat input and mask").
"""

from __future__ import annotations

__all__ = ["validate_mask_token_id"]


def validate_mask_token_id(mask_token_id: object, vocab_size: int | None = None) -> int:
    """The one check of a mask token id: an int in [0, vocab_size) (only >= 0 while the vocab is unknown).

    Called by `draft.DraftConfig`, by the config loader (no vocabulary known yet) and by
    `peagle.vocab.check_mask_token` (prepare), which also refuses an id that occurs in the data.
    """
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int):
        raise ValueError(f"mask_token_id must be an int, got {mask_token_id!r}")
    if mask_token_id < 0 or (vocab_size is not None and mask_token_id >= vocab_size):
        rows = f": the target embedding has {vocab_size} rows (valid ids 0..{vocab_size - 1})" if vocab_size else ""
        raise ValueError(f"mask_token_id {mask_token_id} is out of range{rows}; it must be >= 0")
    return mask_token_id
