"""Stage 1 — records from disk: JSONL / JSON / parquet / ``datasets`` directories → :class:`Record`.

A record is one of three kinds (``Record.kind``): a chat (``CHAT``: OpenAI ``messages`` or ShareGPT
``conversations``, turned into OpenAI-style messages, every OpenAI content form: ``peagle.data.chat``),
plain text (``TEXT``: ``{"text": "..."}``, for base models) or token ids (``TOKENS``:
``{"input_ids": [...], "loss_mask": [...]}``, ``loss_mask`` optional). :func:`read_records` reads chats
only unless asked for more kinds (``peagle prepare`` takes all three; ``peagle.data.text`` tokenizes the
other two). A bad record is a :class:`RecordError` naming ``file:line`` with a reason bucket, raised or
handed to ``on_bad`` (``prepare --on-error skip``), so one broken line never hides behind a traceback.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from peagle.data.chat import ChatFormatError, normalize_message

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

# Bad-record reasons (strict mode: an error naming file:line; --on-error skip: counted and listed).
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
BAD_RECORD = "bad_record"
UNKNOWN_ROLE = "unknown_role"
BAD_TOKENS = "bad_tokens"  # a token-ids record: an id that is no token, a loss_mask that does not fit
UNWANTED_KIND = "not_a_chat"  # a text / token-ids record where only chats are read

# Record kinds (``Record.kind``; counted by ``prepare`` in the summary and the manifest).
CHAT = "chat"
TEXT = "text"
TOKENS = "tokens"
RECORD_KINDS = (CHAT, TEXT, TOKENS)


class DataError(ValueError):
    """Bad input data or tokenizer setup; the message is one line naming the file/line when known."""


class RecordError(DataError):
    """One unusable record: ``str(e)`` names ``source:line``; ``reason`` is its bucket for skip mode."""

    def __init__(self, message: str, reason: str, source: str, line: int) -> None:
        super().__init__(message)
        self.reason, self.source, self.line = reason, source, line


@dataclass
class Record:
    """One record of ``kind`` CHAT (OpenAI-style messages, extra fields such as tool_calls kept, optional
    tools), TEXT (``text``) or TOKENS (``input_ids`` and a 0/1 ``loss_mask`` of the same length)."""

    messages: list[dict[str, Any]]  # [] unless kind is CHAT
    source: str
    line: int  # 1-based line (JSONL) or record number (JSON list, parquet, datasets dir)
    tools: list[Any] | None = None
    kind: str = CHAT
    text: str | None = None
    input_ids: list[int] | None = None
    loss_mask: list[int] | None = None


@dataclass(frozen=True)
class SplitSpec:
    """Parsed ``name[start:stop]`` (ints or percentages); name picks a split of a DatasetDict."""

    name: str | None
    start: float | None = None
    stop: float | None = None
    percent: bool = False

    @classmethod
    def parse(cls, spec: str | None) -> SplitSpec:
        """``None`` / ``""`` (everything), ``NAME``, ``NAME[a:b]``, ``[a:b]`` or ``NAME[:N%]``."""
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
        """True when the bounds depend on the record count (percentages, negative indices)."""
        return self.percent or any(v is not None and v < 0 for v in (self.start, self.stop))


def _message(m: Any, i: int, role: str, where: str, source: str, line: int) -> dict[str, Any]:
    try:
        return normalize_message(m, i, role)
    except ChatFormatError as e:
        raise RecordError(f"{where}: {e}", e.reason, source, line) from None


def _int_list(values: Any, name: str, source: str, line: int, *, bools: bool = False) -> list[int]:
    """``values`` as a list of Python ints (``bools``: true/false read as 1/0); a RecordError
    (BAD_TOKENS) naming ``source:line`` and the first entry that is not one."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise RecordError(f"{source}:{line}: '{name}' must be a list of integers, got {type(values).__name__}",
                          BAD_TOKENS, source, line)
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, int) or (isinstance(v, bool) and not bools):
            raise RecordError(f"{source}:{line}: '{name}'[{i}] is {v!r}, not an integer", BAD_TOKENS, source,
                              line)
    return [int(v) for v in out] if bools else out


def _tokens_record(obj: Mapping[str, Any], source: str, line: int) -> Record:
    """A TOKENS record: ``input_ids`` ints, ``loss_mask`` (default all ones) 0/1 of the same length.

    Which ids are tokens depends on the tokenizer: ``peagle.data.text.check_token_ids`` checks that."""
    ids = _int_list(obj["input_ids"], "input_ids", source, line)
    if obj.get("loss_mask") is None:
        return Record([], source, line, kind=TOKENS, input_ids=ids, loss_mask=[1] * len(ids))
    mask = _int_list(obj["loss_mask"], "loss_mask", source, line, bools=True)
    if len(mask) != len(ids):
        raise RecordError(f"{source}:{line}: 'loss_mask' has {len(mask)} entries but 'input_ids' has {len(ids)}",
                          BAD_TOKENS, source, line)
    for i, v in enumerate(mask):
        if v not in (0, 1):
            raise RecordError(f"{source}:{line}: 'loss_mask'[{i}] is {v}; a loss mask holds 0 or 1", BAD_TOKENS,
                              source, line)
    return Record([], source, line, kind=TOKENS, input_ids=ids, loss_mask=mask)


def normalize_record(obj: Any, source: str, line: int, *, kinds: Collection[str] = (CHAT,)) -> Record:
    """Turn one raw record (dict) into a Record: a chat (OpenAI-style messages), or, when ``kinds``
    allows them, a text (``{"text": ...}``) or token-ids (``{"input_ids": ..., "loss_mask": ...}``) record.

    A record with ``messages`` / ``conversations`` is a chat whatever else it holds. Raises
    :class:`RecordError` (a DataError) naming ``source:line``: not an object, unknown role, content
    that is not text (``peagle.data.chat``), tool calls that are not valid, token ids or a loss mask
    that are not lists of integers (0/1 for the mask, as many as the ids), a kind not in ``kinds``.
    """
    where = f"{source}:{line}"

    def bad(msg: str, reason: str = BAD_RECORD) -> RecordError:
        return RecordError(f"{where}: {msg}", reason, source, line)

    if not isinstance(obj, Mapping):
        raise bad("expected a JSON object with 'messages' or 'conversations'"
                  + (", 'text' or 'input_ids'" if set(kinds) - {CHAT} else ""))
    if obj.get("messages") is None and obj.get("conversations") is None:
        kind = TEXT if obj.get("text") is not None else TOKENS if obj.get("input_ids") is not None else None
        if kind is not None and kind not in kinds:
            key = "text" if kind == TEXT else "input_ids"
            allowed = " and ".join(k for k in RECORD_KINDS if k in kinds)
            raise bad(f"a {kind} record ({key!r}); only {allowed} records are read here", UNWANTED_KIND)
        if kind == TEXT:
            if obj.get("input_ids") is not None:
                raise bad("record has both 'text' and 'input_ids'; give one of them")
            if not isinstance(obj["text"], str):
                raise bad(f"'text' must be a string, got {type(obj['text']).__name__}")
            return Record([], source, line, kind=TEXT, text=obj["text"])
        if kind == TOKENS:
            return _tokens_record(obj, source, line)
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
        keys = ["messages", "conversations"] + [key for key, k in (("text", TEXT), ("input_ids", TOKENS))
                                                if k in kinds]
        raise bad(f"record has neither {' nor '.join(map(repr, keys))} (keys: {sorted(obj)})")
    if isinstance(system, str) and system and not (out and out[0]["role"] in ("system", "developer")):
        out.insert(0, {"role": "system", "content": system})
    return Record(out, source, line, tools or None)


_Raw = tuple[Any, str, int]  # one parsed record before normalize_record: (object, source, line)
_Item = _Raw | RecordError  # what the source iterators yield: a parsed record, or why one is unusable


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
            yield obj, str(path), lineno


def read_text(path: Path) -> str:
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
    text = read_text(path)
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
        yield rec, str(path), i


def _iter_rows(rows: Iterable[Mapping[str, Any]], source: str) -> Iterator[_Item]:
    for i, row in enumerate(rows, 1):
        yield row, source, i


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
            yield row, str(path), i


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
    kinds: Collection[str] = (CHAT,),
) -> Iterator[Record]:
    """Yield normalised records from the given files/directories, in order: chats, and the other
    ``kinds`` (TEXT, TOKENS) when asked for; a record of another kind is a bad record (``not_a_chat``).

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
        if not isinstance(item, RecordError):
            try:
                rec = normalize_record(*item, kinds=kinds)
            except RecordError as e:
                item = e
            else:
                yield rec
                continue
        if on_bad is None:
            raise item
        on_bad(item)
