"""Chat data → token ids + loss mask → packed rows → the EAGLE shift.

Pipeline (DESIGN §1, §2 "data"):

1. ``read_records``: chat records from JSONL / JSON / parquet / a ``datasets`` directory, OpenAI
   ``messages`` or ShareGPT ``conversations``, normalised to OpenAI-style messages.
2. ``tokenize_chat``: the target's chat template renders each record; the loss mask marks exactly
   the assistant tokens (``{% generation %}`` blocks, or prefix rendering when the template has none).
3. ``prepare``: the ``peagle prepare`` core — a tokenized dataset on disk, a manifest, and token counts
   (supervised tokens for the draft vocabulary, all tokens for the mask-token check).
4. ``pack`` / ``collate``: examples into rows of ``max_length`` tokens with per-row document ids.
5. ``eagle_shift``: THE one place the EAGLE shift happens, on packed rows, per document.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.safetensors"
DATASET_SUBDIR = "dataset"
_ARROW_CHUNK = 1024  # examples per in-memory Arrow chunk while preparing

OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "function_response": "tool",
    "observation": "tool",
}

# Drop reasons (counted in the manifest and the summary).
NO_ASSISTANT = "no_assistant"
TOO_LONG = "too_long"
PROMPT_TOO_LONG = "prompt_longer_than_max_length"
NO_SUPERVISED = "no_supervised_tokens"
TEMPLATE_ERROR = "template_error"
TEMPLATE_NOT_INCREMENTAL = "template_not_incremental"


class DataError(ValueError):
    """Bad input data or tokenizer setup; the message is one line naming the file/line when known."""


# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One chat: OpenAI-style messages (extra fields such as tool_calls kept), optional tools."""

    messages: list[dict[str, Any]]
    source: str
    line: int  # 1-based line (JSONL) or record number (JSON list, parquet, datasets dir)
    tools: list[Any] | None = None


@dataclass(frozen=True)
class SplitSpec:
    """Parsed ``name[start:stop]`` (ints or percentages); name picks a split of a DatasetDict."""

    name: str | None
    start: float | None = None
    stop: float | None = None
    percent: bool = False

    @classmethod
    def parse(cls, spec: str | None) -> SplitSpec:
        if not spec:
            return cls(None)
        m = re.fullmatch(r"\s*([\w\-.]*)\s*(?:\[\s*([-\d.]*%?)\s*:\s*([-\d.]*%?)\s*\])?\s*", spec)
        if m is None:
            raise DataError(f"bad split {spec!r}: expected NAME, NAME[start:stop] or NAME[:N%]")
        name, a, b = m.group(1) or None, m.group(2) or "", m.group(3) or ""
        pct = a.endswith("%") or b.endswith("%")
        if pct and any(x and not x.endswith("%") for x in (a, b)):
            raise DataError(f"bad split {spec!r}: mix of percentages and counts")
        try:
            start = float(a.rstrip("%")) if a else None
            stop = float(b.rstrip("%")) if b else None
        except ValueError as e:
            raise DataError(f"bad split {spec!r}: {e}") from None
        if not pct and any(v is not None and v != int(v) for v in (start, stop)):
            raise DataError(f"bad split {spec!r}: slice bounds must be integers")
        return cls(name, start, stop, pct)

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None

    def bounds(self, total: int | None) -> tuple[int, int | None]:
        """Integer [start, stop) (stop None = to the end); ``total`` is needed for % and negatives."""

        def conv(v: float | None) -> int | None:
            if v is None:
                return None
            if self.percent:
                assert total is not None
                v = round(total * v / 100)
            v = int(v)
            if v < 0:
                assert total is not None
                v = max(0, total + v)
            return v

        return conv(self.start) or 0, conv(self.stop)

    def needs_total(self) -> bool:
        return self.percent or any(v is not None and v < 0 for v in (self.start, self.stop))


def _normalise(obj: Any, source: str, line: int) -> Record:
    """Turn one raw record (dict) into a Record with OpenAI-style messages; unknown roles raise."""
    where = f"{source}:{line}"
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object with 'messages' or 'conversations'")
    tools = obj.get("tools")
    if isinstance(tools, str):  # some datasets store tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'tools' is a string that is not valid JSON") from None
    if obj.get("messages") is not None:
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise DataError(f"{where}: 'messages' must be a list")
        out = []
        for m in msgs:
            if not isinstance(m, Mapping) or "role" not in m:
                raise DataError(f"{where}: each message needs a 'role'")
            role = m["role"]
            if role not in OPENAI_ROLES:
                raise DataError(f"{where}: unknown role {role!r} (expected one of {sorted(OPENAI_ROLES)})")
            out.append({k: v for k, v in m.items() if v is not None})
        return Record(out, source, line, tools or None)
    if obj.get("conversations") is not None:
        conv = obj["conversations"]
        if not isinstance(conv, list):
            raise DataError(f"{where}: 'conversations' must be a list")
        out = []
        for m in conv:
            if not isinstance(m, Mapping):
                raise DataError(f"{where}: each conversation turn must be an object")
            if "from" in m:
                raw = str(m["from"])
                role = SHAREGPT_ROLES.get(raw.lower())
                if role is None:
                    raise DataError(
                        f"{where}: unknown role {raw!r} (expected one of {sorted(SHAREGPT_ROLES)})"
                    )
                msg = {k: v for k, v in m.items() if k not in ("from", "value") and v is not None}
                msg["role"] = role
                msg["content"] = m.get("value", "")
                out.append(msg)
            elif "role" in m:  # conversations column holding OpenAI-style turns
                if m["role"] not in OPENAI_ROLES:
                    raise DataError(f"{where}: unknown role {m['role']!r}")
                out.append({k: v for k, v in m.items() if v is not None})
            else:
                raise DataError(f"{where}: conversation turn without 'from' or 'role'")
        return Record(out, source, line, tools or None)
    raise DataError(f"{where}: record has neither 'messages' nor 'conversations' (keys: {sorted(obj)})")


def _iter_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield _normalise(obj, str(path), lineno)


def _iter_json(path: Path) -> Iterator[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if "\n" in text.strip():  # maybe JSON Lines under a .json name
            first = text.lstrip().split("\n", 1)[0]
            try:
                json.loads(first)
            except json.JSONDecodeError:
                pass
            else:
                yield from _iter_jsonl(path)
                return
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, Mapping):
        for key in ("data", "train", "records"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of records")
    for i, rec in enumerate(obj, 1):
        yield _normalise(rec, str(path), i)


def _iter_rows(rows: Iterable[Mapping[str, Any]], source: str) -> Iterator[Record]:
    for i, row in enumerate(rows, 1):
        yield _normalise(row, source, i)


def _iter_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield _normalise(row, str(path), i)


def _iter_datasets_dir(path: Path, split: str | None) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        name = split or ("train" if "train" in ds else None)
        if name is None or name not in ds:
            raise DataError(f"{path}: pick a split with NAME[...] (available: {sorted(ds)})")
        ds = ds[name]
    yield from _iter_rows(ds, str(path))


def _is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        or (path / "state.json").exists()
    )


def _iter_source(path: Path, split: str | None) -> Iterator[Record]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if _is_datasets_dir(path):
        yield from _iter_datasets_dir(path, split)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError(f"{path}: directory has no .jsonl/.json/.parquet files and is not a datasets dir")
        for p in files:
            yield from _iter_source(p, split)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix == ".json":
        yield from _iter_json(path)
    else:
        yield from _iter_jsonl(path)


def read_records(
    paths: str | Path | Sequence[str | Path], *, split: str | None = None, limit: int | None = None
) -> Iterator[Record]:
    """Yield normalised chat records from the given files/directories, in order.

    ``split`` (e.g. ``"train[:1000]"``, ``"[10:20]"``, ``"train[:5%]"``) picks a split of a
    ``datasets`` DatasetDict by name and slices the concatenated record stream; ``limit`` caps the
    number of records after slicing. Reading stops early when possible, so a malformed line past
    the slice is never seen.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    spec = SplitSpec.parse(split)

    def stream() -> Iterator[Record]:
        for p in paths:
            yield from _iter_source(Path(p), spec.name)

    if spec.needs_total():
        records: Iterable[Record] = list(stream())
        start, stop = spec.bounds(len(records))  # type: ignore[arg-type]
    else:
        records = stream()
        start, stop = spec.bounds(None)
    if limit is not None:
        stop = start + limit if stop is None else min(stop, start + limit)
    yield from islice(records, start, stop)


# --------------------------------------------------------------------------------------------
# Tokenization with the chat template
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedExample:
    """Token ids and the 0/1 assistant mask (unshifted); ``drop_reason`` set when unusable."""

    input_ids: list[int]
    loss_mask: list[int]
    drop_reason: str | None = None
    truncated: bool = False
    error: str | None = None


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def load_chat_template(chat_template: str | Path | None) -> str | None:
    """A template given as a file path (``--chat-template FILE``) or as the template text itself."""
    if chat_template is None:
        return None
    p = Path(chat_template)
    try:
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            if p.suffix == ".json":  # tokenizer_config.json-style file
                obj = json.loads(text)
                text = obj["chat_template"] if isinstance(obj, dict) else text
            return text
    except OSError:
        pass
    if "{%" in str(chat_template) or "{{" in str(chat_template):
        return str(chat_template)
    raise DataError(f"chat template file {chat_template} not found")


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> str:
    """The template that will be used: the explicit one, else the tokenizer's own; error if none."""
    if chat_template is not None:
        return chat_template
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates: use "default"
        tpl = tpl.get("default")
    if not tpl:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "pass one with --chat-template FILE (a Jinja file)"
        )
    return tpl


def _render(tokenizer: Any, messages: list[dict], template: str, tools: Any, gen_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen_prompt
    )


def _prefix_spans(
    tokenizer: Any, messages: list[dict], template: str, tools: Any, full: str
) -> list[tuple[int, int]] | None:
    """Character spans of assistant turns in ``full`` by incremental prefix rendering.

    For assistant message i: the span is render(messages[:i+1]) minus render(messages[:i]) with the
    generation prompt (so the assistant header is not supervised), trailing whitespace excluded.
    None when the template is not prefix-consistent (a later turn changes earlier text).
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1], template, tools, False)
        if not full.startswith(upto):
            return None
        start = None
        for gen in (True, False):
            before = _render(tokenizer, messages[:i], template, tools, gen) if i else ""
            if upto.startswith(before):
                start = len(before)
                break
        if start is None:
            return None
        end = len(upto.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token overlapping a span (the rule HF's assistant mask uses)."""
    mask = [0] * len(offsets)
    si = 0
    for t, (a, b) in enumerate(offsets):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si == len(spans):
            break
        if b > spans[si][0]:
            mask[t] = 1
    return mask


def _keep_last_run(mask: list[int]) -> list[int]:
    """Keep only the last contiguous run of ones (the last assistant turn)."""
    out = [0] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = 1
        i -= 1
    return out


def tokenize_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_length: int,
    *,
    last_turn_only: bool = False,
    chat_template: str | None = None,
    truncate: bool = True,
    tools: list[Any] | None = None,
) -> TokenizedExample:
    """Render ``messages`` with the chat template and mark exactly the assistant tokens.

    Uses ``apply_chat_template(return_assistant_tokens_mask=True)`` when the template has
    ``{% generation %}`` blocks; otherwise (or when that mask comes out empty although assistant
    turns exist) the spans come from incremental prefix rendering. Longer than ``max_length``:
    truncated (``truncate``) or dropped (``too_long``); no supervised token left: dropped.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    template = resolve_chat_template(tokenizer, chat_template)
    if not any(m.get("role") == "assistant" for m in messages):
        return TokenizedExample([], [], NO_ASSISTANT)
    try:
        ids: list[int] | None = None
        mask: list[int] | None = None
        if _GENERATION_TAG.search(template):
            out = tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True,
            )
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            if not any(mask) and any(m.get("content") for m in messages if m["role"] == "assistant"):
                ids = mask = None  # generation tag in an unused branch: use prefix rendering
        if ids is None:
            full = _render(tokenizer, messages, template, tools, False)
            spans = _prefix_spans(tokenizer, messages, template, tools, full)
            if spans is None:
                return TokenizedExample([], [], TEMPLATE_NOT_INCREMENTAL)
            if last_turn_only:
                spans = spans[-1:]
            enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids, mask = list(enc["input_ids"]), _mask_from_spans(enc["offset_mapping"], spans)
        elif last_turn_only:
            mask = _keep_last_run(mask)
    except DataError:
        raise
    except Exception as e:  # the template rejected this record (jinja raise_exception, bad fields)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return TokenizedExample([], [], TEMPLATE_ERROR, error=msg)

    if not any(mask):
        return TokenizedExample(ids, mask, NO_SUPERVISED)
    truncated = False
    if len(ids) > max_length:
        if not truncate:
            return TokenizedExample(ids, mask, TOO_LONG)
        ids, mask, truncated = ids[:max_length], mask[:max_length], True
        if not any(mask[1:]):
            return TokenizedExample(ids, mask, PROMPT_TOO_LONG, truncated=True)
    if not any(mask[1:]):  # only position 0 supervised: nothing survives the EAGLE shift
        return TokenizedExample(ids, mask, NO_SUPERVISED)
    return TokenizedExample(ids, mask, None, truncated)


# --------------------------------------------------------------------------------------------
# prepare: the `peagle prepare` core
# --------------------------------------------------------------------------------------------


def _histogram_edges(max_length: int) -> list[int]:
    edges = [0]
    e = 32
    while e < max_length:
        edges.append(e)
        e *= 2
    edges.append(max_length + 1)
    return edges


@dataclass
class PrepareSummary:
    """Counts of a ``prepare`` run (also stored in the manifest)."""

    output_dir: str
    read: int
    kept: int
    dropped: dict[str, int]
    truncated: int
    tokens: int
    supervised_tokens: int
    histogram: list[tuple[int, int, int]]  # (lo, hi inclusive, count) over kept example lengths
    errors: list[str] = field(default_factory=list)  # first few template errors

    def format_summary(self) -> str:
        """Human-readable summary: read / kept / dropped by reason, tokens, length histogram."""
        lines = [
            f"examples read: {self.read}",
            f"examples kept: {self.kept}" + (f" ({self.truncated} truncated)" if self.truncated else ""),
        ]
        dropped = sum(self.dropped.values())
        lines.append(f"examples dropped: {dropped}")
        for reason, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}")
        for err in self.errors:
            lines.append(f"  e.g. {err}")
        frac = self.supervised_tokens / self.tokens if self.tokens else 0.0
        lines.append(f"tokens: {self.tokens}")
        lines.append(f"supervised tokens: {self.supervised_tokens} ({frac:.1%})")
        lines.append("length histogram:")
        width = max((c for _, _, c in self.histogram), default=0)
        for lo, hi, c in self.histogram:
            bar = "#" * (round(40 * c / width) if width else 0)
            lines.append(f"  {lo:>6}-{hi:<6} {c:>8} {bar}")
        return "\n".join(lines)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _target_vocab_size(tokenizer_path: str | Path, tokenizer: Any, trust_remote_code: bool) -> int:
    """Target embedding rows if a model config sits next to the tokenizer, else len(tokenizer)."""
    n = len(tokenizer)
    if (Path(tokenizer_path) / "config.json").exists():
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
            cfg = getattr(cfg, "text_config", None) or cfg
            n = max(n, int(getattr(cfg, "vocab_size", 0) or 0))
        except Exception:
            pass
    return n


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
    vocab_size: int | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_errors_shown: int = 3,
) -> PrepareSummary:
    """Tokenize chat data with the target's tokenizer/template and write it to ``output_dir``.

    Writes ``dataset/`` (HF ``save_to_disk``: columns input_ids int32, loss_mask int8, unshifted),
    ``manifest.json`` (sources, tokenizer, template sha256, counts, histogram) and
    ``token_counts.safetensors`` (``supervised`` and ``all``: int64 [vocab_size] token frequencies).
    The folder appears atomically (written to a temp dir, then renamed). Raises DataError when no
    example survives filtering, listing the drop reasons.
    """
    from datasets import Dataset, Features, Value, concatenate_datasets
    from datasets import Sequence as DsSequence
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise DataError(f"output directory {output_dir} is not empty (use overwrite)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise DataError(f"cannot load a tokenizer from {tokenizer_path}: {str(e).splitlines()[0]}") from None
    template = resolve_chat_template(tokenizer, load_chat_template(chat_template))
    V = vocab_size or _target_vocab_size(tokenizer_path, tokenizer, trust_remote_code)
    input_list = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)

    sup_counts = torch.zeros(V, dtype=torch.int64)
    all_counts = torch.zeros(V, dtype=torch.int64)
    features = Features({"input_ids": DsSequence(Value("int32")), "loss_mask": DsSequence(Value("int8"))})
    chunks: list[Any] = []  # compact Arrow chunks, so a large corpus never sits in Python lists
    kept_ids: list[list[int]] = []
    kept_mask: list[list[int]] = []
    lengths: list[int] = []
    kept = 0

    def flush() -> None:
        if kept_ids:
            chunks.append(Dataset.from_dict({"input_ids": kept_ids, "loss_mask": kept_mask}, features=features))
            kept_ids.clear()
            kept_mask.clear()
    dropped: Counter[str] = Counter()
    errors: list[str] = []
    read = truncated = tokens = supervised = 0
    for rec in tqdm(read_records(input_list, split=split, limit=limit), desc="tokenizing", unit="ex",
                    disable=not progress):
        read += 1
        ex = tokenize_chat(tokenizer, rec.messages, max_length, last_turn_only=last_turn_only,
                           chat_template=template, truncate=not drop_long, tools=rec.tools)
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
        lengths.append(len(ex.input_ids))
        kept += 1
        if len(kept_ids) >= _ARROW_CHUNK:
            flush()
        truncated += ex.truncated
        tokens += len(ex.input_ids)
        supervised += int(m.sum())

    flush()
    if not kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "no records read"
        hint = f" (e.g. {errors[0]})" if errors else ""
        raise DataError(f"empty dataset after filtering: {read} read, 0 kept; dropped {reasons}{hint}")

    edges = _histogram_edges(max_length)
    len_t = torch.tensor(lengths)
    hist = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        c = int(((len_t >= lo) & (len_t < hi)).sum())
        hist.append((lo, hi - 1, c))

    summary = PrepareSummary(str(output_dir), read, kept, dict(dropped), truncated, tokens,
                             supervised, hist, errors)
    manifest = {
        "format": "peagle-prepared-v1",
        "sources": [{"path": str(Path(p).resolve()),
                     "size": Path(p).stat().st_size if Path(p).is_file() else None} for p in input_list],
        "split": split,
        "limit": limit,
        "tokenizer": {"path": str(Path(tokenizer_path).resolve()) if Path(tokenizer_path).exists()
                      else str(tokenizer_path),
                      "name_or_path": getattr(tokenizer, "name_or_path", None),
                      "class": type(tokenizer).__name__, "len": len(tokenizer)},
        "chat_template_sha256": _sha256(template),
        "chat_template_source": str(chat_template) if chat_template is not None else "tokenizer",
        "vocab_size": V,
        "max_length": max_length,
        "last_turn_only": last_turn_only,
        "drop_long": drop_long,
        "counts": {"read": read, "kept": kept, "dropped": dict(dropped), "truncated": truncated,
                   "tokens": tokens, "supervised_tokens": supervised},
        "length_histogram": [list(h) for h in hist],
        "errors": errors,
        "columns": {"input_ids": "int32", "loss_mask": "int8"},
        "shifted": False,
    }

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
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
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


@dataclass
class PreparedData:
    """A ``prepare`` output loaded back: dataset rows (input_ids, loss_mask), manifest, counts."""

    path: Path
    dataset: Any  # datasets.Dataset
    manifest: dict[str, Any]
    supervised_counts: Tensor  # int64 [V]
    all_counts: Tensor  # int64 [V]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.dataset[int(i)]

    @property
    def lengths(self) -> list[int]:
        """Token count of every example (for packing), without decoding the id lists."""
        import pyarrow.compute as pc

        col = self.dataset.data.column("input_ids")
        return pc.list_value_length(col).to_pylist()


def load_prepared(path: str | Path) -> PreparedData:
    """Load a ``prepare`` output directory (clear DataError if it is not one)."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MANIFEST).exists() or not (path / DATASET_SUBDIR).exists():
        raise DataError(
            f"{path} is not a prepared dataset (no {MANIFEST} / {DATASET_SUBDIR}/); run peagle prepare first"
        )
    manifest = json.loads((path / MANIFEST).read_text())
    counts = load_file(str(path / TOKEN_COUNTS))
    ds = load_from_disk(str(path / DATASET_SUBDIR))
    return PreparedData(path, ds, manifest, counts["supervised"], counts["all"])


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


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
    for b, row in enumerate(rows):
        off = 0
        for d, i in enumerate(row):
            ex = examples[int(i)]
            x = torch.as_tensor(_field(ex, "input_ids"), dtype=torch.int64)
            m = torch.as_tensor(_field(ex, "loss_mask")).bool()
            L = x.numel()
            if off + L > max_length:
                raise ValueError(f"row {b} overflows max_length {max_length}")
            ids[b, off:off + L] = x
            mask[b, off:off + L] = m
            docs[b, off:off + L] = d
            exi[b, off:off + L] = int(i)
            pos[b, off:off + L] = torch.arange(L)
            off += L
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


# --------------------------------------------------------------------------------------------
# The EAGLE shift (DESIGN §1) — the one place it happens
# --------------------------------------------------------------------------------------------


@dataclass
class Shifted:
    """Shifted rows: element j = (token x[j+1], aux g[j]), target/final y[j+1], loss bit l[j+1].

    Element j is padding (document −1, loss 0, token 0) when j is padding, j is the last position of
    its row, or j+1 belongs to another document. position_ids = position of j within its document.
    """

    input_ids: Tensor
    loss_mask: Tensor
    document_ids: Tensor
    position_ids: Tensor
    aux_hidden: Tensor | None = None
    final_hidden: Tensor | None = None
    example_index: Tensor | None = None


def _shift_next(t: Tensor, dim: int) -> Tensor:
    """t[j+1] along ``dim``; the last slot gets zeros (it is padding anyway)."""
    out = torch.zeros_like(t)
    n = t.shape[dim]
    out.narrow(dim, 0, n - 1).copy_(t.narrow(dim, 1, n - 1))
    return out


def eagle_shift(
    input_ids: Tensor,
    loss_mask: Tensor,
    document_ids: Tensor,
    aux_hidden: Tensor | None = None,
    final_hidden: Tensor | None = None,
    *,
    example_index: Tensor | None = None,
    pad_token_id: int = 0,
) -> Shifted:
    """Apply the EAGLE shift to packed rows ([B, n] or [n]; hidden tensors [..., n, H]).

    Element j pairs token x[j+1] with aux g[j] (same index), final/target hidden y[j+1] and loss bit
    l[j+1]. When j+1 is in another document, or j is the last position, element j becomes padding,
    so a document of N tokens yields N−1 elements and document runs stay contiguous (the last slot
    of every document becomes padding). ``example_index`` (per position) is kept at index j.
    """
    one_d = input_ids.dim() == 1
    if one_d:
        input_ids, loss_mask, document_ids = input_ids[None], loss_mask[None], document_ids[None]
        aux_hidden = None if aux_hidden is None else aux_hidden[None]
        final_hidden = None if final_hidden is None else final_hidden[None]
        example_index = None if example_index is None else example_index[None]
    if input_ids.shape != loss_mask.shape or input_ids.shape != document_ids.shape:
        raise ValueError("input_ids, loss_mask and document_ids must have the same shape")
    next_doc = _shift_next(document_ids, 1)
    next_doc[:, -1] = -1
    valid = (document_ids >= 0) & (next_doc == document_ids)
    ids = torch.where(valid, _shift_next(input_ids, 1), torch.full_like(input_ids, pad_token_id))
    lm = _shift_next(loss_mask.bool(), 1) & valid
    docs = torch.where(valid, document_ids, torch.full_like(document_ids, -1))
    pos = positions_in_document(docs)
    aux = None
    if aux_hidden is not None:
        aux = torch.where(valid[..., None], aux_hidden, torch.zeros((), dtype=aux_hidden.dtype,
                                                                   device=aux_hidden.device))
    fin = None
    if final_hidden is not None:
        fin = torch.where(valid[..., None], _shift_next(final_hidden, 1),
                          torch.zeros((), dtype=final_hidden.dtype, device=final_hidden.device))
    exi = None
    if example_index is not None:
        exi = torch.where(valid, example_index, torch.full_like(example_index, -1))
    out = Shifted(ids, lm, docs, pos, aux, fin, exi)
    if one_d:
        for k, v in asdict(out).items():
            if v is not None:
                setattr(out, k, v[0])
    return out


# --------------------------------------------------------------------------------------------
# COD seeds
# --------------------------------------------------------------------------------------------


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


def num_rows_estimate(lengths: Sequence[int], max_length: int) -> int:
    """Lower bound on packed rows (total tokens / max_length), for progress bars and schedules."""
    return max(1, math.ceil(sum(lengths) / max_length))
