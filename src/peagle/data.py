"""Chat data → token ids + loss mask → packed rows → the EAGLE shift.

Pipeline (docs/conventions.md, docs/internals.md):

1. ``read_records``: chat records from JSONL / JSON / parquet / a ``datasets`` directory, OpenAI
   ``messages`` or ShareGPT ``conversations``, normalised to OpenAI-style messages (every OpenAI
   content form: ``peagle.chat``). Bad records raise one-line errors naming file:line, or are
   handed to ``on_bad`` (``prepare --on-error skip``).
2. ``tokenize_chat_examples``: the target's chat template renders each record; the loss mask marks
   exactly the assistant tokens, each assistant turn in the form the model generates it at serving
   time (after its history as the template renders it). When the template renders every turn that
   way inside the full conversation (incremental templates: Llama-3.1, ChatML) the record is one
   example; when it rewrites earlier turns (Qwen3 strips their reasoning, some templates move the
   system prompt) the record becomes one example per distinct rendering (strategy ``per_turn``).
   Spans come from ``{% generation %}`` blocks when the template has them, else prefix rendering.
3. ``prepare``: the ``peagle prepare`` core — a tokenized dataset on disk, a manifest, token counts
   (supervised tokens for the draft vocabulary, all tokens for the mask-token check), the draft
   vocabulary and mask token, all written as one atomic directory.
4. ``pack`` / ``collate``: examples into rows of ``max_length`` tokens with per-row document ids.
5. ``eagle_shift``: THE one place the EAGLE shift happens, on packed rows, per document.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .chat import ChatFormatError, normalize_message, reasoning_of, template_messages

MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.safetensors"
DATASET_SUBDIR = "dataset"
DRAFT_VOCAB = "draft_vocab.json"  # the draft vocab size + mask token chosen by prepare (read by train)
FORMAT = "peagle-prepared-v1"
_ARROW_CHUNK = 1024  # examples per in-memory Arrow chunk while preparing

OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
OPENAI_ROLE_ALIASES = {"function": "tool"}  # the legacy OpenAI role of a function result
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
TEMPLATE_NOT_INCREMENTAL = "template_not_incremental"  # not even one turn's serving form is locatable

# Bad-record reasons (strict mode: an error naming file:line; --on-error skip: counted and listed).
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
BAD_RECORD = "bad_record"
UNKNOWN_ROLE = "unknown_role"

# How a record was turned into examples (manifest "tokenization", summary).
ONE_RENDERING = "one_rendering"  # every assistant turn appears in the full rendering as generated
PER_TURN = "per_turn"  # the template rewrites earlier turns: one example per distinct rendering
GENERATION_FULL = "generation_full_rendering"  # serving forms not locatable: {% generation %} spans of
#                                                the full rendering (earlier turns as the template shows them)

ON_ERROR_CHOICES = ("strict", "skip")
SKIP_HINT = "to skip bad records and list them in the summary, pass --on-error skip"


class DataError(ValueError):
    """Bad input data or tokenizer setup; the message is one line naming the file/line when known."""


class RecordError(DataError):
    """One unusable record: ``str(e)`` names ``source:line``; ``reason`` is its bucket for skip mode."""

    def __init__(self, message: str, reason: str, source: str, line: int) -> None:
        super().__init__(message)
        self.reason, self.source, self.line = reason, source, line


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


def _message(m: Any, i: int, role: str, where: str, source: str, line: int) -> dict[str, Any]:
    try:
        return normalize_message(m, i, role)
    except ChatFormatError as e:
        raise RecordError(f"{where}: {e}", e.reason, source, line) from None


def _normalise(obj: Any, source: str, line: int) -> Record:
    """Turn one raw record (dict) into a Record with OpenAI-style messages.

    Raises :class:`RecordError` (a DataError) naming ``source:line``: not an object, unknown role,
    content that is not text (``peagle.chat``), tool calls that are not valid.
    """
    where = f"{source}:{line}"

    def bad(msg: str, reason: str = BAD_RECORD) -> RecordError:
        return RecordError(f"{where}: {msg}", reason, source, line)

    if not isinstance(obj, Mapping):
        raise bad("expected a JSON object with 'messages' or 'conversations'")
    tools = obj.get("tools")
    if isinstance(tools, str):  # some datasets store tools as a JSON string
        if not tools.strip():
            tools = None
        else:
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError:
                raise bad("'tools' is a string that is not valid JSON") from None
    if tools is not None and not isinstance(tools, list):
        raise bad(f"'tools' must be a list of tool schemas, got {type(tools).__name__}")
    system = obj.get("system")  # a top-level system prompt (LLaMA-Factory-style ShareGPT records)
    if obj.get("messages") is not None:
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise bad("'messages' must be a list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or "role" not in m:
                raise bad(f"message {i} needs a 'role'")
            role = OPENAI_ROLE_ALIASES.get(m["role"], m["role"])
            if role not in OPENAI_ROLES:
                raise bad(f"unknown role {m['role']!r} (expected one of {sorted(OPENAI_ROLES)})", UNKNOWN_ROLE)
            out.append(_message(m, i, role, where, source, line))
    elif obj.get("conversations") is not None:
        conv = obj["conversations"]
        if not isinstance(conv, list):
            raise bad("'conversations' must be a list")
        out = []
        for i, m in enumerate(conv):
            if not isinstance(m, Mapping):
                raise bad(f"conversation turn {i} must be an object")
            if "from" in m:
                raw = str(m["from"])
                role = SHAREGPT_ROLES.get(raw.lower())
                if role is None:
                    raise bad(f"unknown role {raw!r} (expected one of {sorted(SHAREGPT_ROLES)})", UNKNOWN_ROLE)
                msg = {k: v for k, v in m.items() if k not in ("from", "value")}
                msg["content"] = m.get("value")
                out.append(_message(msg, i, role, where, source, line))
            elif "role" in m:  # conversations column holding OpenAI-style turns
                role = OPENAI_ROLE_ALIASES.get(m["role"], m["role"])
                if role not in OPENAI_ROLES:
                    raise bad(f"unknown role {m['role']!r} (expected one of {sorted(OPENAI_ROLES)})",
                              UNKNOWN_ROLE)
                out.append(_message(m, i, role, where, source, line))
            else:
                raise bad(f"conversation turn {i} has neither 'from' nor 'role'")
    else:
        raise bad(f"record has neither 'messages' nor 'conversations' (keys: {sorted(obj)})")
    if isinstance(system, str) and system and not (out and out[0]["role"] in ("system", "developer")):
        out.insert(0, {"role": "system", "content": system})
    return Record(out, source, line, tools or None)


_Item = Record | RecordError  # what the source iterators yield: a record, or why one is unusable


def _decode_line(raw: bytes, path: Path, lineno: int) -> str | RecordError:
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a UTF-8 BOM is a normal UTF-8 file
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        col = len(raw[: e.start].decode("utf-8", "replace")) + 1
        return RecordError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
                           "re-encode the file as UTF-8", NOT_UTF8, str(path), lineno)


def _iter_jsonl(path: Path) -> Iterator[_Item]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = _decode_line(raw, path, lineno)
            if isinstance(text, RecordError):
                yield text
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield RecordError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})",
                                  MALFORMED_JSON, str(path), lineno)
                continue
            yield _record_or_error(obj, str(path), lineno)


def _record_or_error(obj: Any, source: str, line: int) -> _Item:
    try:
        return _normalise(obj, source, line)
    except RecordError as e:
        return e


def _read_text(path: Path) -> str:
    """A whole UTF-8 file (BOM accepted); a non-UTF-8 byte is a DataError naming file:line."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-encode the file "
                        "as UTF-8") from None


def _iter_json(path: Path) -> Iterator[_Item]:
    text = _read_text(path)
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
        yield _record_or_error(rec, str(path), i)


def _iter_rows(rows: Iterable[Mapping[str, Any]], source: str) -> Iterator[_Item]:
    for i, row in enumerate(rows, 1):
        yield _record_or_error(row, source, i)


def _iter_parquet(path: Path) -> Iterator[_Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield _record_or_error(row, str(path), i)


def _split_name_error(path: Path, name: str) -> DataError:
    return DataError(
        f"split {name!r}: {path} has no named splits (a data file or a single saved Dataset is the 'train' "
        "split, as in datasets.load_dataset); use a slice such as [:1000] or train[:1000]"
    )


def _iter_datasets_dir(path: Path, split: str | None) -> Iterator[_Item]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        name = split or ("train" if "train" in ds else None)
        if name is None or name not in ds:
            raise DataError(f"{path}: pick a split with NAME[...] (available: {sorted(ds)})")
        ds = ds[name]
    elif split not in (None, "train"):
        raise _split_name_error(path, split)
    yield from _iter_rows(ds, str(path))


def _is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        or (path / "state.json").exists()
    )


def _iter_source(path: Path, split: str | None) -> Iterator[_Item]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if _is_datasets_dir(path):
        yield from _iter_datasets_dir(path, split)
        return
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError(f"{path}: directory has no .jsonl/.json/.parquet files and is not a datasets dir")
        for p in files:
            yield from _iter_source(p, split)
        return
    if split not in (None, "train"):
        raise _split_name_error(path, split)
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix == ".json":
        yield from _iter_json(path)
    else:
        yield from _iter_jsonl(path)


def read_records(
    paths: str | Path | Sequence[str | Path],
    *,
    split: str | None = None,
    limit: int | None = None,
    on_bad: Callable[[RecordError], None] | None = None,
) -> Iterator[Record]:
    """Yield normalised chat records from the given files/directories, in order.

    ``split`` (e.g. ``"train[:1000]"``, ``"[10:20]"``, ``"train[:5%]"``) picks a split of a
    ``datasets`` DatasetDict by name and slices the concatenated record stream (a data file is the
    ``train`` split; another name for it is an error); ``limit`` caps the number of records after
    slicing. Positions count every record, bad ones included. Reading stops early when possible, so
    a malformed line past the slice is never seen. A bad record raises its :class:`RecordError`, or
    with ``on_bad`` is passed to it and skipped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    spec = SplitSpec.parse(split)

    def stream() -> Iterator[_Item]:
        for p in paths:
            yield from _iter_source(Path(p), spec.name)

    if spec.needs_total():
        items: Iterable[_Item] = list(stream())
        start, stop = spec.bounds(len(items))  # type: ignore[arg-type]
    else:
        items = stream()
        start, stop = spec.bounds(None)
    if limit is not None:
        stop = start + limit if stop is None else min(stop, start + limit)
    for item in islice(items, start, stop):
        if isinstance(item, RecordError):
            if on_bad is None:
                raise item
            on_bad(item)
            continue
        yield item


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


@dataclass
class ChatTokenization:
    """What one record gives: its examples (each kept or with a drop reason) and how it was split.

    ``strategy``: ONE_RENDERING, PER_TURN or GENERATION_FULL (None when the record failed as a
    whole); ``reasoning_not_rendered``: assistant turns whose reasoning the template never shows.
    """

    examples: list[TokenizedExample]
    strategy: str | None = None
    reasoning_not_rendered: int = 0


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def load_chat_template(chat_template: str | Path | None) -> str | None:
    """A template given as a file path (``--chat-template FILE``) or as the template text itself."""
    if chat_template is None:
        return None
    p = Path(chat_template)
    try:
        if p.is_file():
            text = _read_text(p)
            if p.suffix == ".json":  # tokenizer_config.json-style file
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
                text = obj.get("chat_template") if isinstance(obj, dict) else None
                if isinstance(text, list):  # named templates: [{"name": ..., "template": ...}]
                    text = next((t.get("template") for t in text if t.get("name") == "default"), None)
                if not isinstance(text, str):
                    raise DataError(f"{p}: no 'chat_template' string in this JSON file")
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


def _render(tokenizer: Any, messages: list[dict], template: str, tools: Any, gen_prompt: bool,
            kwargs: Mapping[str, Any] | None = None) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen_prompt,
        **(kwargs or {}),
    )


@dataclass
class _Turn:
    """Assistant message ``index`` as generated at serving time: ``text`` = render(messages[:index+1]),
    the generated part is text[start:end] (after the generation prompt, trailing whitespace excluded)."""

    index: int
    text: str
    start: int
    end: int


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _serving_forms(messages: list[dict], render: Callable[[int, bool], str]) -> tuple[list[_Turn], str | None]:
    """Every assistant turn rendered as the last message after its history, with its generated span.

    The span starts after render(messages[:i], add_generation_prompt=True) (so the assistant header
    the server writes is not supervised), or after render(messages[:i]) for templates without a
    generation prompt. Returns (turns, None), or (turns so far, why) when a turn's history is not a
    prefix of its own rendering (e.g. a template that prints the message count first).
    ``render(n, gen)`` renders messages[:n] (with the generation prompt when ``gen``).
    """
    turns: list[_Turn] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(i + 1, False)
        start = 0 if i == 0 else None
        for gen in (True, False):
            if start is not None:
                break
            before = render(i, gen)
            if upto.startswith(before):
                start = len(before)
        if start is None:
            before = render(i, True)
            p = _first_difference(before, upto)
            return turns, (
                f"the chat template renders the conversation before assistant message {i} differently once "
                f"that message is added (first difference at character {p}: {before[p:p + 30]!r} vs "
                f"{upto[p:p + 30]!r}), so its tokens cannot be located; use a template with "
                "{% generation %} blocks (--chat-template FILE)"
            )
        turns.append(_Turn(i, upto, start, len(upto.rstrip())))
    return turns, None


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


def _finish(ids: list[int], mask: list[int], max_length: int, truncate: bool) -> TokenizedExample:
    """Truncate (or drop) to ``max_length``; drop when nothing supervised survives the EAGLE shift."""
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


def _group_turns(turns: Sequence[_Turn]) -> list[list[_Turn]]:
    """Group turns by the rendering that holds them as generated: each group's first turn is the
    latest (its rendering is the example); an earlier turn joins when that rendering starts with its
    serving form up to its span end. Groups come out in conversation order."""
    groups: list[list[_Turn]] = []
    for t in reversed(turns):
        if t.end <= t.start:
            continue
        for g in groups:
            if g[0].text.startswith(t.text[: t.end]):
                g.append(t)
                break
        else:
            groups.append([t])
    return [sorted(g, key=lambda t: t.index) for g in reversed(groups)]


def tokenize_chat_examples(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_length: int,
    *,
    last_turn_only: bool = False,
    chat_template: str | None = None,
    truncate: bool = True,
    tools: list[Any] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> ChatTokenization:
    """Render ``messages`` with the chat template; supervise each assistant turn as it is generated.

    Each assistant turn is supervised in the form the model generates it at serving time: rendered
    as the last message after its history, after the generation prompt. When the full rendering
    holds every turn that way (incremental templates), the record is one example (ONE_RENDERING);
    otherwise (the template rewrites earlier turns, e.g. strips their reasoning) each distinct
    rendering is one example supervising the turns it holds as generated (PER_TURN). With
    ``{% generation %}`` blocks the mask is the template's own (restricted to those turns), else the
    spans come from prefix rendering. ``last_turn_only``: supervise only the last assistant turn.
    Longer than ``max_length``: truncated (``truncate``) or dropped (``too_long``).
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    template = resolve_chat_template(tokenizer, chat_template)
    if not any(m.get("role") == "assistant" for m in messages):
        return ChatTokenization([TokenizedExample([], [], NO_ASSISTANT)])
    msgs = template_messages(messages, template)
    has_gen = bool(_GENERATION_TAG.search(template))
    kw = dict(template_kwargs or {})

    cache: dict[tuple[int, bool], str] = {}

    def render(n: int, gen: bool) -> str:
        if (n, gen) not in cache:
            cache[(n, gen)] = _render(tokenizer, msgs[:n], template, tools, gen, kw)
        return cache[(n, gen)]

    def encode(upto: int, text: str) -> tuple[list[int], Any, list[int] | None]:
        """(ids, offsets, the template's {% generation %} mask or None) of render(msgs[:upto])."""
        if has_gen:  # one call gives ids, offsets and the template's own mask
            out = tokenizer.apply_chat_template(msgs[:upto], tools=tools, chat_template=template, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True, **kw)
            if out.encodings:
                gm = list(out["assistant_masks"])
                return list(out["input_ids"]), out.encodings[0].offsets, gm if any(gm) else None
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), enc["offset_mapping"], None

    try:
        try:
            turns, problem = _serving_forms(msgs, render)
        except Exception as e:
            if not has_gen:
                raise
            turns, problem = [], str(e).splitlines()[0] if str(e) else type(e).__name__
        full = render(len(msgs), False)
        examples: list[TokenizedExample] = []
        if problem is not None:
            if not has_gen:
                return ChatTokenization([TokenizedExample([], [], TEMPLATE_NOT_INCREMENTAL, error=problem)])
            ids, _, gm = encode(len(msgs), full)
            gm = gm or [0] * len(ids)
            examples.append(_finish(ids, _keep_last_run(gm) if last_turn_only else gm, max_length, truncate))
            strategy = GENERATION_FULL
        else:
            chosen = [t for t in turns if t.end > t.start]
            if last_turn_only:
                chosen = chosen[-1:]
            if all(full.startswith(t.text[: t.end]) for t in chosen):
                strategy, groups = ONE_RENDERING, [(full, len(msgs), chosen)]
            else:
                strategy = PER_TURN
                groups = [(g[-1].text, g[-1].index + 1, g) for g in _group_turns(chosen)]
            for text, upto, group in groups:
                ids, offsets, gm = encode(upto, text)
                mask = _mask_from_spans(offsets, [(t.start, t.end) for t in group])
                if gm is not None:  # the template's own marks, inside the supervised turns only
                    region = _mask_from_spans(offsets, [(t.start, len(t.text)) for t in group])
                    inside = [a & b for a, b in zip(gm, region, strict=True)]
                    mask = inside if any(inside) else mask
                examples.append(_finish(ids, mask, max_length, truncate))
            if not examples:
                examples.append(TokenizedExample([], [], NO_SUPERVISED))
        hidden = 0
        for t in turns:
            reasoning = reasoning_of(msgs[t.index])
            if isinstance(reasoning, str) and reasoning.strip() and reasoning.strip() not in t.text[t.start:]:
                hidden += 1
    except DataError:
        raise
    except Exception as e:  # the template rejected this record (jinja raise_exception, bad fields)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return ChatTokenization([TokenizedExample([], [], TEMPLATE_ERROR, error=msg)])
    return ChatTokenization(examples, strategy, hidden)


def tokenize_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_length: int,
    *,
    last_turn_only: bool = False,
    chat_template: str | None = None,
    truncate: bool = True,
    tools: list[Any] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> TokenizedExample:
    """The one example of a record (see :func:`tokenize_chat_examples`).

    Raises DataError for a record that needs several examples (a template that rewrites earlier
    turns); use :func:`tokenize_chat_examples` for those.
    """
    out = tokenize_chat_examples(tokenizer, messages, max_length, last_turn_only=last_turn_only,
                                 chat_template=chat_template, truncate=truncate, tools=tools,
                                 template_kwargs=template_kwargs)
    if len(out.examples) != 1:
        raise DataError(f"this chat gives {len(out.examples)} examples (the chat template rewrites earlier "
                        "turns); use tokenize_chat_examples")
    return out.examples[0]


# --------------------------------------------------------------------------------------------
# Tokenizer fingerprints: a prepared dataset belongs to one tokenizer
# --------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """``{"class", "len", "vocab_sha256"}``: the sha256 covers every (token, id) pair, added tokens
    included, so two tokenizers of the same size but another vocabulary differ."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"class": type(tokenizer).__name__, "len": len(tokenizer), "vocab_sha256": digest}


def _load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load a tokenizer from {path}: {first}") from None


def check_dataset_matches_target(
    manifest: Mapping[str, Any],
    tokenizer: Any,
    *,
    dataset: str | Path = "the dataset",
    target: str | Path | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Refuse a prepared dataset whose tokenizer (class, length, vocabulary sha256) or chat template
    differ from the target's; ``tokenizer`` is a tokenizer or a directory to load one from.

    Raises one-line DataError naming each difference. Checks only what the manifest records (older
    datasets have no vocab sha256); the template is compared when the data was prepared with the
    tokenizer's own template (not ``--chat-template``).
    """
    if isinstance(tokenizer, (str, Path)):
        target = target if target is not None else tokenizer
        tokenizer = _load_tokenizer(tokenizer, trust_remote_code)
    target = target if target is not None else getattr(tokenizer, "name_or_path", "the target")
    rec = manifest.get("tokenizer") or {}
    have = tokenizer_fingerprint(tokenizer)
    diffs = []
    if rec.get("vocab_sha256") and rec["vocab_sha256"] != have["vocab_sha256"]:
        diffs.append(f"vocabulary sha256 {rec['vocab_sha256'][:12]}… vs {have['vocab_sha256'][:12]}…")
    if rec.get("len") is not None and int(rec["len"]) != have["len"]:
        diffs.append(f"tokenizer length {rec['len']} vs {have['len']}")
    if rec.get("class") and rec["class"] != have["class"]:
        diffs.append(f"tokenizer class {rec['class']} vs {have['class']}")
    recorded_tpl = manifest.get("chat_template_sha256")
    if recorded_tpl and manifest.get("chat_template_source", "tokenizer") == "tokenizer":
        tpl = getattr(tokenizer, "chat_template", None)
        tpl = tpl.get("default") if isinstance(tpl, dict) else tpl
        if not tpl:
            diffs.append("chat template: the target's tokenizer has none")
        elif _sha256(tpl) != recorded_tpl:
            diffs.append(f"chat template sha256 {recorded_tpl[:12]}… vs {_sha256(tpl)[:12]}…")
    if diffs:
        raise DataError(f"{dataset} was prepared for another tokenizer than {target}'s ({'; '.join(diffs)}); "
                        "prepare the data again with this target")


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


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _target_vocab_size(tokenizer_path: str | Path, tokenizer: Any, trust_remote_code: bool) -> int:
    """Target embedding rows if a model config sits next to the tokenizer, else len(tokenizer)."""
    n = len(tokenizer)
    if (Path(tokenizer_path) / "config.json").exists():
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
            cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            n = max(n, int(getattr(cfg, "vocab_size", 0) or 0))
        except Exception:
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
    counts, bad records, histogram), ``token_counts.safetensors`` (``supervised`` and ``all``:
    int64 [vocab_size] token frequencies) and ``draft_vocab.json`` (draft vocab size — the N most
    frequent supervised tokens, default the full vocab —, coverage and ``mask_token_id``, checked
    against the data). Everything is written to a hidden temp dir renamed into place at the end, so
    a failed run leaves nothing. ``on_error``: ``"strict"`` (a bad record is an error naming
    file:line) or ``"skip"`` (counted by reason, the first few listed). Raises DataError when no
    example survives filtering, listing the drop reasons.
    """
    from datasets import Dataset, Features, Value, concatenate_datasets
    from datasets import Sequence as DsSequence
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .fsutil import atomic_dir
    from .vocab import build_draft_vocab, check_mask_token, choose_mask_token_id

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
    tokenizer = _load_tokenizer(tokenizer_path, trust_remote_code)
    template = resolve_chat_template(tokenizer, load_chat_template(chat_template))
    V = vocab_size or _target_vocab_size(tokenizer_path, tokenizer, trust_remote_code)
    if draft_vocab_size is not None and not 1 <= draft_vocab_size <= V:
        raise DataError(f"--draft-vocab-size must be in [1, {V}] (the target vocab), got {draft_vocab_size}")
    if isinstance(mask_token_id, int):
        try:
            check_mask_token(mask_token_id, V)
        except ValueError as e:
            raise DataError(str(e)) from None
    has_gen = bool(_GENERATION_TAG.search(template))

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
        "chat_template_sha256": _sha256(template),
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
        (tmp / DRAFT_VOCAB).write_text(json.dumps(choice, indent=2) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
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

    def record_groups(self) -> list[list[int]]:
        """Example indices grouped by the chat they came from (first-seen order): a chat whose template
        rewrites history gives several examples, which must land on the same side of a train/val split.
        Datasets without the ``record`` column: one group per example."""
        if "record" not in self.dataset.column_names:
            return [[i] for i in range(len(self))]
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(self.dataset.data.column("record").to_pylist()):
            groups.setdefault(int(r), []).append(i)
        return list(groups.values())


def load_prepared(path: str | Path) -> PreparedData:
    """Load a ``prepare`` output directory (clear DataError if it is not one)."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MANIFEST).exists() or not (path / DATASET_SUBDIR).exists():
        raise DataError(
            f"{path} is not a prepared dataset (no {MANIFEST} / {DATASET_SUBDIR}/); run peagle prepare first"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        counts = load_file(str(path / TOKEN_COUNTS))
        ds = load_from_disk(str(path / DATASET_SUBDIR))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: a damaged prepared dataset ({first}); run peagle prepare again") from None
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
# The EAGLE shift (docs/conventions.md) — the one place it happens
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
