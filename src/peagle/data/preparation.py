"""Stage 3 — ``peagle prepare``: records → tokenized dataset + manifest + token counts, one atomic dir.

Reads records (``records``), tokenizes chats with the target's template (``templates``) and plain text /
token ids without one (``text``: every text token supervised, long ones split), counts tokens
(supervised ones for the draft vocabulary, all of them for the mask-token check), chooses the draft
vocabulary and mask token, and writes the directory described in ``prepared`` through
``peagle.util.files.atomic_dir``: it appears complete or not at all. The choice is recorded once, in
``manifest["draft_vocab"]`` (read back as ``PreparedData.draft_choice``). ``prepare`` runs the stages
in order: ``_check_arguments`` (before the tokenizer loads), ``_load_tokenizer``, ``_tokenize_sources``,
``_choose_draft_vocab``, ``_summary`` / ``_manifest``, ``_write``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peagle.data.prepared import (
    DATASET_SUBDIR,
    FORMAT,
    MANIFEST,
    TOKEN_COUNTS,
    load_tokenizer,
    sha256_text,
    tokenizer_fingerprint,
)
from peagle.data.records import (
    CHAT,
    RECORD_KINDS,
    TEXT,
    TOKENS,
    DataError,
    Record,
    RecordError,
    SplitSpec,
    read_records,
)
from peagle.data.summary import STRATEGY_TEXT, PrepareSummary
from peagle.data.templates import (
    ChatTokenization,
    TokenizedExample,
    has_generation_blocks,
    load_chat_template,
    resolve_chat_template,
    tokenize_chat_examples,
)
from peagle.data.text import tokenize_record
from peagle.data.vocab import build_draft_vocab, check_mask_token, choose_mask_token
from peagle.util.files import atomic_dir

_ARROW_CHUNK = 1024  # examples per in-memory Arrow chunk while preparing
ON_ERROR_CHOICES = ("strict", "skip")
SKIP_HINT = "to skip bad records and list them in the summary, pass --on-error skip"
# What the loss mask marks, by record kind (manifest "tokenization").
SUPERVISION = {
    CHAT: "each assistant turn as generated at serving time (after its rendered history)",
    TEXT: "every token (tokenized with the tokenizer's special tokens, no chat template)",
    TOKENS: "the record's loss_mask (every token when it has none)",
}


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


@dataclass(frozen=True)
class _Request:
    """``prepare``'s arguments once ``_check_arguments`` has passed them (inputs a list, a parsed mask id)."""

    inputs: list[str | Path]
    tokenizer_path: str | Path
    output_dir: Path
    max_length: int
    last_turn_only: bool
    drop_long: bool
    split: str | None
    limit: int | None
    chat_template: str | Path | None
    chat_template_kwargs: Mapping[str, Any] | None
    vocab_size: int | None
    draft_vocab_size: int | None
    mask_token_id: int | str  # an int, or "auto"
    on_error: str
    trust_remote_code: bool
    progress: bool
    max_errors_shown: int


@dataclass(frozen=True)
class _Tokenizer:
    """The target's tokenizer, its resolved chat template (None for a base model: then ``no_template``
    says why, for the first chat record), the target vocab size V and the ids token records may hold."""

    tokenizer: Any
    template: str | None
    vocab_size: int
    has_gen: bool  # the template marks assistant spans with {% generation %} blocks
    vocab_limit: int  # token ids of TOKENS records lie in [0, vocab_limit): min(len(tokenizer), V)
    no_template: str | None = None


class _Tally:
    """What the tokenizing pass accumulates: the kept examples as compact Arrow chunks (so a large
    corpus never sits in Python lists), token counts over the target vocab, and the run's counts."""

    def __init__(self, vocab_size: int, max_errors_shown: int) -> None:
        from datasets import Features, Value
        from datasets import Sequence as DsSequence

        self.vocab_size, self.max_errors_shown = vocab_size, max_errors_shown
        self.sup_counts = torch.zeros(vocab_size, dtype=torch.int64)  # supervised tokens: the draft vocab
        self.all_counts = torch.zeros(vocab_size, dtype=torch.int64)  # all tokens: the mask-token check
        self.features = Features({"input_ids": DsSequence(Value("int32")), "loss_mask": DsSequence(Value("int8")),
                                  "record": Value("int64")})
        self.chunks: list[Any] = []
        # examples since the last flush; "record": the record each comes from (per_turn: several share one)
        self.pending: dict[str, list[Any]] = {"input_ids": [], "loss_mask": [], "record": []}
        self.lengths: list[int] = []
        self.dropped: Counter[str] = Counter()
        self.strategies: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()  # good records read, by kind (chat, text, tokens)
        self.kept_by_kind: Counter[str] = Counter()  # examples written, by the kind of their record
        self.bad: Counter[str] = Counter()
        self.errors: list[str] = []
        self.bad_examples: list[str] = []
        self.kept = self.records_kept = self.read = self.truncated = self.tokens = self.supervised = 0
        self.hidden_reasoning = 0
        self.split_records = self.split_examples = 0  # text / token records longer than max_length: pieces

    def on_bad(self, e: RecordError) -> None:
        """A bad record skipped by ``read_records`` (``--on-error skip``): counted, the first few kept."""
        self.bad[e.reason] += 1
        if len(self.bad_examples) < self.max_errors_shown:
            self.bad_examples.append(str(e))

    def add(self, rec: Record, out: ChatTokenization) -> None:
        """Count one good record and keep its usable examples."""
        self.read += 1
        self.kinds[rec.kind] += 1
        if out.strategy is not None:
            self.strategies[out.strategy] += 1
        if rec.kind != CHAT and len(out.examples) > 1:  # split at max_length (``peagle.data.text``)
            self.split_records += 1
            self.split_examples += len(out.examples)
        self.hidden_reasoning += out.reasoning_not_rendered > 0
        any_kept = False
        for ex in out.examples:
            if ex.drop_reason is not None:
                self.dropped[ex.drop_reason] += 1
                if ex.error and len(self.errors) < self.max_errors_shown:
                    self.errors.append(f"{rec.source}:{rec.line}: {ex.error}")
                continue
            self._keep(rec, ex)
            self.kept_by_kind[rec.kind] += 1
            any_kept = True
        self.records_kept += any_kept

    def _keep(self, rec: Record, ex: TokenizedExample) -> None:
        """Check the ids against V, count them, and queue the example for the next Arrow chunk."""
        V = self.vocab_size
        ids = torch.tensor(ex.input_ids, dtype=torch.int64)
        if ids.numel() and int(ids.max()) >= V:
            raise DataError(f"{rec.source}:{rec.line}: token id {int(ids.max())} >= vocab size {V}")
        m = torch.tensor(ex.loss_mask, dtype=torch.bool)
        self.all_counts += torch.bincount(ids, minlength=V)
        self.sup_counts += torch.bincount(ids[m], minlength=V)
        self.pending["input_ids"].append(ex.input_ids)
        self.pending["loss_mask"].append(ex.loss_mask)
        self.pending["record"].append(self.read - 1)
        self.lengths.append(len(ex.input_ids))
        self.kept += 1
        if len(self.pending["record"]) >= _ARROW_CHUNK:
            self.flush()
        self.truncated += ex.truncated
        self.tokens += len(ex.input_ids)
        self.supervised += int(m.sum())

    def flush(self) -> None:
        """Move the examples kept since the last flush into one Arrow chunk."""
        from datasets import Dataset

        if self.pending["record"]:
            self.chunks.append(Dataset.from_dict(self.pending, features=self.features))
            self.pending = {k: [] for k in self.pending}


def _check_arguments(
    inputs: str | Path | Sequence[str | Path], output_dir: str | Path, *, max_length: int, limit: int | None,
    split: str | None, mask_token_id: int | str, chat_template_kwargs: Mapping[str, Any] | None, on_error: str,
    overwrite: bool,
) -> tuple[list[str | Path], Path, int | str]:
    """The checks that need no tokenizer, run before it loads: (inputs as a list, output dir, mask id)."""
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
    return input_list, output_dir, mask_token_id


def _load_tokenizer(req: _Request) -> _Tokenizer:
    """Load the tokenizer and chat template, size the target vocab, and check the vocab arguments.

    A tokenizer without a chat template (a base model) is fine until a chat record needs one."""
    tokenizer = load_tokenizer(req.tokenizer_path, req.trust_remote_code)
    template, no_template = None, None
    try:
        template = resolve_chat_template(tokenizer, load_chat_template(req.chat_template))
    except DataError as e:
        if req.chat_template is not None:  # a template given but unreadable is an error at once
            raise
        no_template = str(e)
    n_tokens = len(tokenizer)
    V = req.vocab_size or n_tokens
    if req.draft_vocab_size is not None and not 1 <= req.draft_vocab_size <= V:
        raise DataError(f"--draft-vocab-size must be in [1, {V}] (the target vocab), got {req.draft_vocab_size}")
    if isinstance(req.mask_token_id, int):
        try:
            check_mask_token(req.mask_token_id, V)
        except ValueError as e:
            raise DataError(str(e)) from None
    return _Tokenizer(tokenizer, template, V, template is not None and has_generation_blocks(template),
                      min(n_tokens, V), no_template)


def _tokenize_record(req: _Request, tok: _Tokenizer, rec: Record) -> ChatTokenization:
    """One record's examples: a chat through the chat template (an error without one), plain text and
    token ids by ``peagle.data.text`` (never through a template)."""
    if rec.kind != CHAT:
        return ChatTokenization(tokenize_record(tok.tokenizer, rec, req.max_length, tok.vocab_limit))
    if tok.template is None:
        raise DataError(f"{rec.source}:{rec.line}: a chat record, but {tok.no_template}")
    return tokenize_chat_examples(
        tok.tokenizer, rec.messages, req.max_length, last_turn_only=req.last_turn_only, chat_template=tok.template,
        truncate=not req.drop_long, tools=rec.tools, template_kwargs=req.chat_template_kwargs)


def _tokenize_sources(req: _Request, tok: _Tokenizer) -> _Tally:
    """Stream the records through ``_tokenize_record``; bad records (token ids outside the vocabulary
    included) fail (strict) or are counted (skip).

    Raises DataError when no example survives, listing the drop reasons."""
    from tqdm.auto import tqdm

    skip = req.on_error == "skip"
    tally = _Tally(tok.vocab_size, req.max_errors_shown)
    records = read_records(req.inputs, split=req.split, limit=req.limit, on_bad=tally.on_bad if skip else None,
                           kinds=RECORD_KINDS)
    try:
        for rec in tqdm(records, desc="tokenizing", unit="rec", disable=not req.progress):
            try:
                out = _tokenize_record(req, tok, rec)
            except RecordError as e:
                if not skip:
                    raise
                tally.on_bad(e)
                continue
            tally.add(rec, out)
    except RecordError as e:
        raise DataError(f"{e}; {SKIP_HINT}") from None
    tally.read += sum(tally.bad.values())
    tally.flush()
    if not tally.kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted((tally.dropped + tally.bad).items())) or "no records read"
        hint = tally.errors[0] if tally.errors else (tally.bad_examples[0] if tally.bad_examples else "")
        hint = f" (e.g. {hint})" if hint else ""
        raise DataError(f"empty dataset after filtering: {tally.read} read, 0 kept; dropped {reasons}{hint}")
    return tally


def _choose_draft_vocab(req: _Request, tok: _Tokenizer, tally: _Tally) -> dict[str, Any]:
    """The draft vocabulary and mask token belong to the dataset: chosen (and checked) before writing."""
    size = req.draft_vocab_size or tok.vocab_size
    vocab = build_draft_vocab(tally.sup_counts, size)
    try:
        mask = choose_mask_token(tok.tokenizer, tok.vocab_size, req.mask_token_id, tally.all_counts)
    except ValueError as e:
        raise DataError(str(e)) from None
    return {"draft_vocab_size": size, "mask_token_id": mask.token_id, "mask_token_reason": mask.reason,
            "coverage": vocab.coverage, "vocab_size": tok.vocab_size}


def _length_histogram(lengths: list[int], max_length: int) -> list[tuple[int, int, int]]:
    """(lo, hi inclusive, count) of the kept example lengths: buckets 0, 32, 64, … up to max_length."""
    edges, e = [0], 32
    while e < max_length:
        edges.append(e)
        e *= 2
    edges.append(max_length + 1)
    len_t = torch.tensor(lengths)
    return [(lo, hi - 1, int(((len_t >= lo) & (len_t < hi)).sum())) for lo, hi in zip(edges[:-1], edges[1:],
                                                                                        strict=True)]


def _summary(req: _Request, tok: _Tokenizer, tally: _Tally, choice: dict[str, Any]) -> PrepareSummary:
    """The run's counts as returned to the caller (and, through ``_manifest``, stored)."""
    return PrepareSummary(
        str(req.output_dir), tally.read, tally.kept, dict(tally.dropped), tally.truncated, tally.tokens,
        tally.supervised, _length_histogram(tally.lengths, req.max_length), tally.errors,
        records_kept=tally.records_kept, strategies=dict(tally.strategies), kinds=dict(tally.kinds),
        kept_by_kind=dict(tally.kept_by_kind), split_records=tally.split_records,
        split_examples=tally.split_examples,
        mask_source="generation" if tok.has_gen else "prefix", bad_records=dict(tally.bad),
        bad_examples=tally.bad_examples, reasoning_not_rendered=tally.hidden_reasoning,
        vocab_size=tok.vocab_size, draft_vocab_size=choice["draft_vocab_size"], coverage=choice["coverage"],
        mask_token_id=choice["mask_token_id"],
        mask_token_reason=choice["mask_token_reason"],
    )


def _manifest(req: _Request, tok: _Tokenizer, s: PrepareSummary, choice: dict[str, Any]) -> dict[str, Any]:
    """``manifest.json``: sources, tokenizer and template identity, options, counts, the draft vocab.

    The template is recorded only when chat records went through it: text and token ids do not depend
    on it (a base model has none)."""
    tokenizer_path = req.tokenizer_path
    template = tok.template if s.kinds.get(CHAT, 0) else None
    return {
        "format": FORMAT,
        "sources": [{"path": str(Path(p).resolve()),
                     "size": Path(p).stat().st_size if Path(p).is_file() else None} for p in req.inputs],
        "split": req.split,
        "limit": req.limit,
        "tokenizer": {"path": str(Path(tokenizer_path).resolve()) if Path(tokenizer_path).exists()
                      else str(tokenizer_path),
                      "name_or_path": getattr(tok.tokenizer, "name_or_path", None),
                      **tokenizer_fingerprint(tok.tokenizer)},
        "chat_template_sha256": sha256_text(template) if template is not None else None,
        "chat_template_source": None if template is None
        else str(req.chat_template) if req.chat_template is not None else "tokenizer",
        "chat_template_kwargs": dict(req.chat_template_kwargs or {}),
        "tokenization": {
            "supervision": {k: v for k, v in SUPERVISION.items() if k in s.kinds},
            "records_by_kind": dict(s.kinds),
            "spans": None if template is None else "generation" if tok.has_gen else "prefix",
            "records_by_strategy": dict(s.strategies),
            "strategies": {k: v for k, v in STRATEGY_TEXT.items() if k in s.strategies},
            "split": "text and token-id records longer than max_length: consecutive examples of max_length tokens",
        },
        "vocab_size": tok.vocab_size,
        "max_length": req.max_length,
        "last_turn_only": req.last_turn_only,
        "drop_long": req.drop_long,
        "on_error": req.on_error,
        "counts": {"read": s.read, "records_kept": s.records_kept, "kept": s.kept, "dropped": dict(s.dropped),
                   "truncated": s.truncated, "tokens": s.tokens, "supervised_tokens": s.supervised_tokens,
                   "reasoning_not_rendered": s.reasoning_not_rendered, "records_by_kind": dict(s.kinds),
                   "examples_by_kind": dict(s.kept_by_kind), "split_records": s.split_records,
                   "split_examples": s.split_examples},
        "bad_records": {"counts": dict(s.bad_records), "first": s.bad_examples},
        "length_histogram": [list(h) for h in s.histogram],
        "errors": s.errors,
        "draft_vocab": choice,
        "columns": {"input_ids": "int32", "loss_mask": "int8", "record": "int64 (0-based index of the source record "
                    "among the good records read; examples of one per_turn record share it)"},
        "shifted": False,
    }


def _write(output_dir: Path, tally: _Tally, manifest: dict[str, Any], progress: bool) -> None:
    """Write dataset/, token_counts.safetensors and manifest.json as one atomic directory."""
    from datasets import concatenate_datasets
    from datasets.utils import logging as ds_logging
    from safetensors.torch import save_file

    with atomic_dir(output_dir, replace=True) as tmp:
        ds = tally.chunks[0] if len(tally.chunks) == 1 else concatenate_datasets(tally.chunks)
        was_enabled = ds_logging.is_progress_bar_enabled()
        if not progress:
            ds_logging.disable_progress_bar()
        try:
            ds.save_to_disk(str(tmp / DATASET_SUBDIR))
        finally:
            if was_enabled:
                ds_logging.enable_progress_bar()
        save_file({"supervised": tally.sup_counts, "all": tally.all_counts}, str(tmp / TOKEN_COUNTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


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
    """Tokenize chats (with the target's chat template), plain text and token-id records (without one:
    ``peagle.data.text``, long ones split at ``max_length``) and write them to ``output_dir``.

    Writes ``dataset/`` (HF ``save_to_disk``: columns input_ids int32, loss_mask int8, unshifted, and
    record int64: the source record, shared by the examples of a per_turn record),
    ``manifest.json`` (sources, tokenizer fingerprint, template sha256, tokenization strategy,
    counts, bad records, histogram, and under ``draft_vocab`` the draft vocab size — the N most
    frequent supervised tokens, default the full vocab —, coverage and ``mask_token_id``, checked
    against the data) and ``token_counts.safetensors`` (``supervised`` and ``all``: int64
    [vocab_size] token frequencies). Everything is written through ``peagle.util.files.atomic_dir`` (a hidden
    temp dir renamed into place at the end), so a failed run leaves nothing. ``on_error``:
    ``"strict"`` (a bad record is an error naming file:line) or ``"skip"`` (counted by reason, the
    first few listed). ``vocab_size``: the target's embedding rows (`peagle.target.hf.embedding_rows`;
    the CLI and the demo pass it), default ``len(tokenizer)`` for a tokenizer alone. Raises DataError
    when no example survives filtering, listing the drop reasons.
    """
    input_list, out, mask_token_id = _check_arguments(
        inputs, output_dir, max_length=max_length, limit=limit, split=split, mask_token_id=mask_token_id,
        chat_template_kwargs=chat_template_kwargs, on_error=on_error, overwrite=overwrite)
    req = _Request(
        input_list, tokenizer_path, out, max_length=max_length, last_turn_only=last_turn_only,
        drop_long=drop_long, split=split, limit=limit, chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs, vocab_size=vocab_size, draft_vocab_size=draft_vocab_size,
        mask_token_id=mask_token_id, on_error=on_error, trust_remote_code=trust_remote_code, progress=progress,
        max_errors_shown=max_errors_shown)
    tok = _load_tokenizer(req)
    tally = _tokenize_sources(req, tok)
    choice = _choose_draft_vocab(req, tok, tally)
    summary = _summary(req, tok, tally, choice)
    _write(req.output_dir, tally, _manifest(req, tok, summary, choice), req.progress)
    return summary
