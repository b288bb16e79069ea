"""What ``peagle prepare`` reports: counts (by record kind: chat, text, tokens), lengths, the draft
vocabulary and mask token it chose.

Printed at the end of ``prepare`` (`PrepareSummary.format_summary`) and stored in the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from peagle.data.records import CHAT
from peagle.data.templates import GENERATION_FULL, ONE_RENDERING, PER_TURN

__all__ = ["PrepareSummary"]


def _ranked(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """Most frequent first, ties by name (the order the summary lists counts in)."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


STRATEGY_TEXT = {
    ONE_RENDERING: "one rendering holds every assistant turn as generated",
    PER_TURN: "template rewrites earlier turns: one example per distinct rendering",
    GENERATION_FULL: "serving form not locatable: {% generation %} spans of the full rendering",
}


@dataclass
class PrepareSummary:
    """Counts of a ``prepare`` run (also stored in the manifest)."""

    output_dir: str
    read: int  # records read (bad ones included)
    kept: int  # examples written
    dropped: dict[str, int]  # examples (or whole records) dropped, by reason
    truncated: int
    tokens: int
    supervised_tokens: int
    histogram: list[tuple[int, int, int]]  # (lo, hi inclusive, count) over kept example lengths
    errors: list[str] = field(default_factory=list)  # first few template errors (file:line: why)
    records_kept: int = 0  # records with at least one example written
    strategies: dict[str, int] = field(default_factory=dict)  # records by tokenization strategy
    mask_source: str = "prefix"  # "generation" ({% generation %} blocks) or "prefix" (prefix rendering)
    bad_records: dict[str, int] = field(default_factory=dict)  # skipped bad records by reason
    bad_examples: list[str] = field(default_factory=list)  # first few skipped records (file:line: why)
    reasoning_not_rendered: int = 0  # records with reasoning the chat template does not show
    kinds: dict[str, int] = field(default_factory=dict)  # good records read by kind (chat, text, tokens)
    kept_by_kind: dict[str, int] = field(default_factory=dict)  # examples kept by the kind of their record
    split_records: int = 0  # text / token records longer than max_length, split ...
    split_examples: int = 0  # ... into this many pieces (those supervising nothing dropped)
    vocab_size: int = 0
    draft_vocab_size: int = 0
    coverage: float = 1.0
    mask_token_id: int | None = None
    mask_token_reason: str = ""

    def format_summary(self) -> str:
        """Human-readable summary: records (by kind when not all chats), examples kept / dropped by reason,
        bad records skipped, the tokenization strategy, tokens, length histogram, draft vocabulary and
        mask token."""
        bad = sum(self.bad_records.values())
        lines = [f"records read: {self.read}" + (f" ({bad} bad, skipped)" if bad else "")]
        lines.append(f"examples kept: {self.kept} from {self.records_kept} records"
                     + (f" ({self.truncated} truncated)" if self.truncated else ""))
        if set(self.kinds) - {CHAT}:
            lines.append("records by kind: " + ", ".join(
                f"{k} {n} ({self.kept_by_kind.get(k, 0)} examples)" for k, n in _ranked(self.kinds)))
            if self.split_records:
                lines.append(f"  split at max_length: {self.split_records} records into {self.split_examples} "
                             "examples")
        if self.kinds.get(CHAT) or not self.kinds:
            mask = "{% generation %} blocks" if self.mask_source == "generation" else "prefix rendering"
            lines.append(f"assistant spans: {mask}; each turn supervised as generated at serving time")
            lines += [f"  {s}: {n} records ({STRATEGY_TEXT.get(s, s)})" for s, n in _ranked(self.strategies)]
        lines.append(f"examples dropped: {sum(self.dropped.values())}")
        lines += [f"  {reason}: {n}" for reason, n in _ranked(self.dropped)]
        lines += [f"  e.g. {err}" for err in self.errors]
        if bad:
            lines.append(f"bad records skipped: {bad}")
            lines += [f"  {reason}: {n}" for reason, n in _ranked(self.bad_records)]
            lines += [f"  e.g. {err}" for err in self.bad_examples]
        if self.reasoning_not_rendered:
            lines.append(f"note: {self.reasoning_not_rendered} records carry reasoning the chat template does "
                         "not render; it is not trained")
        frac = self.supervised_tokens / self.tokens if self.tokens else 0.0
        lines.append(f"tokens: {self.tokens}")
        lines.append(f"supervised tokens: {self.supervised_tokens} ({frac:.1%})")
        lines.append("length histogram:")
        width = max((c for _, _, c in self.histogram), default=0)
        lines += [f"  {lo:>6}-{hi:<6} {c:>8} {'#' * (round(40 * c / width) if width else 0)}"
                  for lo, hi, c in self.histogram]
        if self.vocab_size:
            lines.append(f"draft vocabulary: {self.draft_vocab_size} of {self.vocab_size} tokens, covering "
                         f"{self.coverage:.2%} of supervised tokens")
        if self.mask_token_id is not None:
            why = f" ({self.mask_token_reason})" if self.mask_token_reason else ""
            lines.append(f"mask_token_id: {self.mask_token_id}{why}")
        return "\n".join(lines)
