"""The limits of P-EAGLE's knobs, in one place, without torch (the config loader checks them at start-up).

`LIMITS` holds the bounds of the sampling and step settings that the config file, `PEagleTrainer` and
`sample_cod` all accept; `check_limit` is their one check (a library caller gets a ValueError, the config
loader turns it into a ConfigError naming the file and key). `validate_mask_token_id` is the one check
of a mask token id (deep COD elements carry it; `DraftConfig` holds it and vLLM reads it from the
exported config; docs/conventions.md, "Flat input and mask").
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["LIMITS", "check_limit", "out_of_range", "validate_mask_token_id"]

# name -> bounds (``ge``, ``gt``, ``le``, ``lt``); integer knobs must be ints, the ratios numbers.
LIMITS: dict[str, dict[str, float]] = {
    "num_depths": {"ge": 1},
    "ratio": {"gt": 0.0, "le": 1.0},
    "ratio_min": {"ge": 0.0, "le": 1.0},  # 0: no floor (depth d keeps r^d of the positions)
    "max_anchors": {"ge": 1},
    "sequence_partitions": {"ge": 1},
}
_INTEGER = ("num_depths", "max_anchors", "sequence_partitions")
_OPTIONAL = ("max_anchors",)
_OPS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def out_of_range(value: float, bounds: Mapping[str, float]) -> str | None:
    """``"must be >= 1"``-style text of the first bound ``value`` breaks, None when it keeps them all."""
    for op, sign in _OPS:
        if op in bounds:
            limit = bounds[op]
            ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[op]
            if not ok:
                return f"must be {sign} {limit}"
    return None


def check_limit(name: str, value: object) -> None:
    """ValueError unless ``value`` is a valid ``name`` (a key of `LIMITS`; None where the knob is optional)."""
    if value is None and name in _OPTIONAL:
        return
    kind = "an int" if name in _INTEGER else "a number"
    if isinstance(value, bool) or not isinstance(value, int if name in _INTEGER else (int, float)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    why = out_of_range(value, LIMITS[name])
    if why is not None:
        raise ValueError(f"{name} = {value!r} is out of range ({why})")


def validate_mask_token_id(mask_token_id: object, vocab_size: int | None = None) -> int:
    """The one check of a mask token id: an int in [0, vocab_size) (only >= 0 while the vocab is unknown).

    Called by `DraftConfig`, by the config loader (no vocabulary known yet) and by
    `peagle.data.vocab.check_mask_token` (prepare), which also refuses an id that occurs in the data.
    """
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int):
        raise ValueError(f"mask_token_id must be an int, got {mask_token_id!r}")
    if mask_token_id < 0 or (vocab_size is not None and mask_token_id >= vocab_size):
        rows = f": the target embedding has {vocab_size} rows (valid ids 0..{vocab_size - 1})" if vocab_size else ""
        raise ValueError(f"mask_token_id {mask_token_id} is out of range{rows}; it must be >= 0")
    return mask_token_id
