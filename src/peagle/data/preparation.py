"""Stage 3 — ``peagle prepare``: records → tokenized dataset + manifest + token counts, one atomic dir.

Reads records (``records``), tokenizes them with the target's template (``templates``), counts tokens
(supervised ones for the draft vocabulary, all of them for the mask-token check), chooses the draft
vocabulary and mask token, and writes the directory described in ``prepared`` through
``peagle.fsutil.atomic_dir``: it appears complete or not at all. The choice is recorded once, in
``manifest["draft_vocab"]`` (read back as ``PreparedData.draft_choice``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..fsutil import atomic_dir
from ..target import TargetError, target_shape
from ..vocab import build_draft_vocab, check_mask_token, choose_mask_token_id
from .prepared import (
    DATASET_SUBDIR,
    FORMAT,
    MANIFEST,
    TOKEN_COUNTS,
    load_tokenizer,
    sha256_text,
    tokenizer_fingerprint,
)
from .records import DataError, RecordError, SplitSpec, read_records
from .templates import (
    GENERATION_FULL,
    ONE_RENDERING,
    PER_TURN,
    has_generation_blocks,
    load_chat_template,
    resolve_chat_template,
    tokenize_chat_examples,
)

_ARROW_CHUNK = 1024  # examples per in-memory Arrow chunk while preparing
ON_ERROR_CHOICES = ("strict", "skip")
SKIP_HINT = "to skip bad records and list them in the summary, pass --on-error skip"


def _histogram_edges(max_length: int) -> list[int]:
    edges = [0]
    e = 32
    while e < max_length:
        edges.append(e)
        e *= 2
    edges.append(max_length + 1)
    return edges


_STRATEGY_TEXT = {
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
    vocab_size: int = 0
    draft_vocab_size: int = 0
    coverage: float = 1.0
    mask_token_id: int | None = None

    def format_summary(self) -> str:
        """Human-readable summary: records, examples kept / dropped by reason, bad records skipped,
        the tokenization strategy, tokens, length histogram, draft vocabulary and mask token."""
        bad = sum(self.bad_records.values())
        lines = [f"records read: {self.read}" + (f" ({bad} bad, skipped)" if bad else "")]
        lines.append(f"examples kept: {self.kept} from {self.records_kept} records"
                     + (f" ({self.truncated} truncated)" if self.truncated else ""))
        mask = "{% generation %} blocks" if self.mask_source == "generation" else "prefix rendering"
        lines.append(f"assistant spans: {mask}; each turn supervised as generated at serving time")
        for strategy, n in sorted(self.strategies.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {strategy}: {n} records ({_STRATEGY_TEXT.get(strategy, strategy)})")
        dropped = sum(self.dropped.values())
        lines.append(f"examples dropped: {dropped}")
        for reason, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}")
        for err in self.errors:
            lines.append(f"  e.g. {err}")
        if bad:
            lines.append(f"bad records skipped: {bad}")
            for reason, n in sorted(self.bad_records.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {reason}: {n}")
            for err in self.bad_examples:
                lines.append(f"  e.g. {err}")
        if self.reasoning_not_rendered:
            lines.append(f"note: {self.reasoning_not_rendered} records carry reasoning the chat template does "
                         "not render; it is not trained")
        frac = self.supervised_tokens / self.tokens if self.tokens else 0.0
        lines.append(f"tokens: {self.tokens}")
        lines.append(f"supervised tokens: {self.supervised_tokens} ({frac:.1%})")
        lines.append("length histogram:")
        width = max((c for _, _, c in self.histogram), default=0)
        for lo, hi, c in self.histogram:
            bar = "#" * (round(40 * c / width) if width else 0)
            lines.append(f"  {lo:>6}-{hi:<6} {c:>8} {bar}")
        if self.vocab_size:
            lines.append(f"draft vocabulary: {self.draft_vocab_size} of {self.vocab_size} tokens, covering "
                         f"{self.coverage:.2%} of supervised tokens")
        if self.mask_token_id is not None:
            lines.append(f"mask_token_id: {self.mask_token_id}")
        return "\n".join(lines)


def _target_vocab_size(tokenizer_path: str | Path, tokenizer: Any, trust_remote_code: bool) -> int:
    """Target embedding rows if a model config sits next to the tokenizer, else len(tokenizer)."""
    n = len(tokenizer)
    if (Path(tokenizer_path) / "config.json").exists():
        try:
            n = max(n, target_shape(tokenizer_path, trust_remote_code)[0])
        except TargetError:  # a tokenizer directory whose config.json is no decoder LM's
            pass
    return n


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a destination that is a file, lies under a file, or holds something not ours."""
    for parent in output_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"--out {output_dir} is under {parent}, which is a file, not a directory")
            break
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise DataError(f"--out {output_dir} is a file, not a directory")
    entries = sorted(p.name for p in output_dir.iterdir())
    if not entries:
        return
    if not overwrite:
        raise DataError(f"output directory {output_dir} is not empty (use --overwrite to replace a prepared "
                        "dataset)")
    try:
        ours = json.loads((output_dir / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        shown = ", ".join(entries[:5]) + (f", … and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise DataError(f"--out {output_dir} is not a prepared dataset (it holds {shown}); --overwrite only "
                        "replaces a directory written by peagle prepare")


def prepare(
    inputs: str | Path | Sequence[str | Path],
    tokenizer_path: str | Path,
    output_dir: str | Path,
    *,
    max_length: int = 2048,
    last_turn_only: bool = False,
    drop_long: bool = False,
    split: str | None = None,
    limit: int | None = None,
    chat_template: str | Path | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
    draft_vocab_size: int | None = None,
    mask_token_id: int | str = "auto",
    on_error: str = "strict",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_errors_shown: int = 5,
) -> PrepareSummary:
    """Tokenize chat data with the target's tokenizer/template and write it to ``output_dir``.

    Writes ``dataset/`` (HF ``save_to_disk``: columns input_ids int32, loss_mask int8, unshifted, and
    record int64: the source record, shared by the examples of a per_turn record),
    ``manifest.json`` (sources, tokenizer fingerprint, template sha256, tokenization strategy,
    counts, bad records, histogram, and under ``draft_vocab`` the draft vocab size — the N most
    frequent supervised tokens, default the full vocab —, coverage and ``mask_token_id``, checked
    against the data) and ``token_counts.safetensors`` (``supervised`` and ``all``: int64
    [vocab_size] token frequencies). Everything is written through ``fsutil.atomic_dir`` (a hidden
    temp dir renamed into place at the end), so a failed run leaves nothing. ``on_error``:
    ``"strict"`` (a bad record is an error naming file:line) or ``"skip"`` (counted by reason, the
    first few listed). Raises DataError when no example survives filtering, listing the drop reasons.
    """
    from datasets import Dataset, Features, Value, concatenate_datasets
    from datasets import Sequence as DsSequence
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if on_error not in ON_ERROR_CHOICES:
        raise DataError(f"--on-error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2, got {max_length}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if mask_token_id != "auto":
        try:
            mask_token_id = int(mask_token_id)
        except (TypeError, ValueError):
            raise DataError(f"--mask-token-id must be 'auto' or an integer, got {mask_token_id!r}") from None
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
        raise DataError("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    input_list = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    SplitSpec.parse(split)  # a bad split is an error before the tokenizer loads
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    template = resolve_chat_template(tokenizer, load_chat_template(chat_template))
    V = vocab_size or _target_vocab_size(tokenizer_path, tokenizer, trust_remote_code)
    if draft_vocab_size is not None and not 1 <= draft_vocab_size <= V:
        raise DataError(f"--draft-vocab-size must be in [1, {V}] (the target vocab), got {draft_vocab_size}")
    if isinstance(mask_token_id, int):
        try:
            check_mask_token(mask_token_id, V)
        except ValueError as e:
            raise DataError(str(e)) from None
    has_gen = has_generation_blocks(template)

    sup_counts = torch.zeros(V, dtype=torch.int64)
    all_counts = torch.zeros(V, dtype=torch.int64)
    features = Features({"input_ids": DsSequence(Value("int32")), "loss_mask": DsSequence(Value("int8")),
                         "record": Value("int64")})
    chunks: list[Any] = []  # compact Arrow chunks, so a large corpus never sits in Python lists
    kept_ids: list[list[int]] = []
    kept_mask: list[list[int]] = []
    kept_record: list[int] = []  # the record each example comes from (per_turn: several examples share one)
    lengths: list[int] = []

    def flush() -> None:
        if kept_ids:
            chunks.append(Dataset.from_dict({"input_ids": kept_ids, "loss_mask": kept_mask, "record": kept_record},
                                            features=features))
            kept_ids.clear()
            kept_mask.clear()
            kept_record.clear()

    dropped: Counter[str] = Counter()
    strategies: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    errors: list[str] = []
    bad_examples: list[str] = []

    def on_bad(e: RecordError) -> None:
        bad[e.reason] += 1
        if len(bad_examples) < max_errors_shown:
            bad_examples.append(str(e))

    kept = records_kept = read = truncated = tokens = supervised = hidden_reasoning = 0
    records = read_records(input_list, split=split, limit=limit, on_bad=on_bad if on_error == "skip" else None)
    try:
        for rec in tqdm(records, desc="tokenizing", unit="rec", disable=not progress):
            read += 1
            out = tokenize_chat_examples(tokenizer, rec.messages, max_length, last_turn_only=last_turn_only,
                                         chat_template=template, truncate=not drop_long, tools=rec.tools,
                                         template_kwargs=chat_template_kwargs)
            if out.strategy is not None:
                strategies[out.strategy] += 1
            hidden_reasoning += out.reasoning_not_rendered > 0
            any_kept = False
            for ex in out.examples:
                if ex.drop_reason is not None:
                    dropped[ex.drop_reason] += 1
                    if ex.error and len(errors) < max_errors_shown:
                        errors.append(f"{rec.source}:{rec.line}: {ex.error}")
                    continue
                ids = torch.tensor(ex.input_ids, dtype=torch.int64)
                if ids.numel() and int(ids.max()) >= V:
                    raise DataError(f"{rec.source}:{rec.line}: token id {int(ids.max())} >= vocab size {V}")
                m = torch.tensor(ex.loss_mask, dtype=torch.bool)
                all_counts += torch.bincount(ids, minlength=V)
                sup_counts += torch.bincount(ids[m], minlength=V)
                kept_ids.append(ex.input_ids)
                kept_mask.append(ex.loss_mask)
                kept_record.append(read - 1)
                lengths.append(len(ex.input_ids))
                kept += 1
                any_kept = True
                if len(kept_ids) >= _ARROW_CHUNK:
                    flush()
                truncated += ex.truncated
                tokens += len(ex.input_ids)
                supervised += int(m.sum())
            records_kept += any_kept
    except RecordError as e:
        raise DataError(f"{e}; {SKIP_HINT}") from None
    read += sum(bad.values())

    flush()
    if not kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted((dropped + bad).items())) or "no records read"
        hint = errors[0] if errors else (bad_examples[0] if bad_examples else "")
        hint = f" (e.g. {hint})" if hint else ""
        raise DataError(f"empty dataset after filtering: {read} read, 0 kept; dropped {reasons}{hint}")

    # the draft vocabulary and mask token belong to the dataset: chosen (and checked) before writing
    size = draft_vocab_size or V
    vocab = build_draft_vocab(sup_counts, size)
    try:
        mask = choose_mask_token_id(tokenizer, V, mask_token_id, all_counts)
    except ValueError as e:
        raise DataError(str(e)) from None
    choice = {"draft_vocab_size": size, "mask_token_id": mask, "coverage": vocab.coverage, "vocab_size": V}

    edges = _histogram_edges(max_length)
    len_t = torch.tensor(lengths)
    hist = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        c = int(((len_t >= lo) & (len_t < hi)).sum())
        hist.append((lo, hi - 1, c))

    summary = PrepareSummary(
        str(output_dir), read, kept, dict(dropped), truncated, tokens, supervised, hist, errors,
        records_kept=records_kept, strategies=dict(strategies), mask_source="generation" if has_gen else "prefix",
        bad_records=dict(bad), bad_examples=bad_examples, reasoning_not_rendered=hidden_reasoning,
        vocab_size=V, draft_vocab_size=size, coverage=vocab.coverage, mask_token_id=mask,
    )
    manifest = {
        "format": FORMAT,
        "sources": [{"path": str(Path(p).resolve()),
                     "size": Path(p).stat().st_size if Path(p).is_file() else None} for p in input_list],
        "split": split,
        "limit": limit,
        "tokenizer": {"path": str(Path(tokenizer_path).resolve()) if Path(tokenizer_path).exists()
                      else str(tokenizer_path),
                      "name_or_path": getattr(tokenizer, "name_or_path", None),
                      **tokenizer_fingerprint(tokenizer)},
        "chat_template_sha256": sha256_text(template),
        "chat_template_source": str(chat_template) if chat_template is not None else "tokenizer",
        "chat_template_kwargs": dict(chat_template_kwargs or {}),
        "tokenization": {
            "supervision": "each assistant turn as generated at serving time (after its rendered history)",
            "spans": "generation" if has_gen else "prefix",
            "records_by_strategy": dict(strategies),
            "strategies": {k: v for k, v in _STRATEGY_TEXT.items() if k in strategies},
        },
        "vocab_size": V,
        "max_length": max_length,
        "last_turn_only": last_turn_only,
        "drop_long": drop_long,
        "on_error": on_error,
        "counts": {"read": read, "records_kept": records_kept, "kept": kept, "dropped": dict(dropped),
                   "truncated": truncated, "tokens": tokens, "supervised_tokens": supervised,
                   "reasoning_not_rendered": hidden_reasoning},
        "bad_records": {"counts": dict(bad), "first": bad_examples},
        "length_histogram": [list(h) for h in hist],
        "errors": errors,
        "draft_vocab": choice,
        "columns": {"input_ids": "int32", "loss_mask": "int8", "record": "int64 (0-based index of the source record "
                    "among the good records read; examples of one per_turn record share it)"},
        "shifted": False,
    }

    with atomic_dir(output_dir, replace=True) as tmp:
        ds = chunks[0] if len(chunks) == 1 else concatenate_datasets(chunks)
        from datasets.utils import logging as ds_logging

        was_enabled = ds_logging.is_progress_bar_enabled()
        if not progress:
            ds_logging.disable_progress_bar()
        try:
            ds.save_to_disk(str(tmp / DATASET_SUBDIR))
        finally:
            if was_enabled:
                ds_logging.enable_progress_bar()
        save_file({"supervised": sup_counts, "all": all_counts}, str(tmp / TOKEN_COUNTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return summary
