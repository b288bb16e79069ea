"""Evaluation prompts: prompt files, their token ids rendered as in training, and the stop ids.

A prompt record is a chat (``messages`` / ``conversations``, normalised like training data by
`peagle.data.normalize_record`, trailing assistant turns dropped), a ``prompt`` (one user message
through the chat template), raw ``text`` or ready ``input_ids``. Errors name the file and line and are
`EvalError`s. Generation ends as vLLM ends it: at the target's generation_config eos ids or the
tokenizer's eos (`stop_token_ids`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peagle.eval.errors import EvalError

__all__ = ["load_prompts", "load_tokenizer", "stop_token_ids", "stop_token_ids_of", "tokenize_prompts"]


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read prompt records from a JSONL file (or a JSON list); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"prompt file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list):
            raise EvalError(f"{path}: expected a JSON list of prompt records")
        out = [_check_record(r, f"{path}[{i}]") for i, r in enumerate(records, 1)]
        if not out:
            raise EvalError(f"{path}: no prompts")
        return out
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        out.append(_check_record(obj, f"{path}:{lineno}"))
    if not out:
        raise EvalError(f"{path}: no prompts")
    return out


def _check_record(obj: Any, where: str) -> dict[str, Any]:
    """The record as a dict carrying its location (``_where``); EvalError when it is no prompt."""
    if isinstance(obj, str):
        return {"prompt": obj, "_where": where}
    if hasattr(obj, "messages") and not isinstance(obj, Mapping):  # a peagle.data.Record
        return {"messages": obj.messages, "tools": getattr(obj, "tools", None), "_where": where}
    keys = ("prompt", "text", "messages", "conversations", "input_ids")
    if not isinstance(obj, Mapping) or not any(k in obj for k in keys):
        raise EvalError(f"{where}: expected an object with one of {', '.join(repr(k) for k in keys)}")
    ids = obj.get("input_ids")
    if ids is not None and (not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids)):
        raise EvalError(f"{where}: 'input_ids' must be a non-empty list of token ids")
    return {**obj, "_where": where}


def _chat_messages(record: Mapping[str, Any], where: str) -> tuple[list[dict[str, Any]], Any]:
    """(messages, tools) of a chat record, normalised like training data, trailing answers dropped."""
    from peagle.data.records import normalize_record

    raw = {k: v for k, v in record.items() if k in ("messages", "conversations", "tools")}
    try:
        rec = normalize_record(raw, where, 0)
    except ValueError as e:
        raise EvalError(str(e).replace(f"{where}:0", where)) from None
    messages = rec.messages
    while messages and messages[-1]["role"] == "assistant":  # the target writes the answer itself
        messages = messages[:-1]
    if not messages:
        raise EvalError(f"{where}: no message before the assistant turn")
    return messages, rec.tools


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[Any], chat_template: str | None = None
) -> list[list[int]]:
    """Token ids of every prompt, rendered as in training.

    - ``{"messages": [...]}`` / ``{"conversations": [...]}``: the chat template with the
      generation prompt; trailing assistant turns are dropped (a training record can be used as is);
    - ``{"prompt": "..."}`` or a bare string: one user message through the chat template (raw text
      when the tokenizer has no template); ``{"prompt": [messages]}`` is a chat;
    - ``{"text": "..."}``: raw text, tokenized with the tokenizer's special tokens (no template);
    - ``{"input_ids": [...]}``: already tokenized (e.g. the prompt of a prepared held-out example), used as is.
    """
    from peagle.data.templates import resolve_chat_template
    from peagle.data.text import encode_text

    template = chat_template or getattr(tokenizer, "chat_template", None) or None
    if isinstance(template, dict):
        template = template.get("default")
    out = []
    for i, rec in enumerate(prompts):
        if not (isinstance(rec, Mapping) and "_where" in rec):
            rec = _check_record(rec, f"prompt {i}")
        where = rec["_where"]
        if "input_ids" in rec:
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in rec["input_ids"]):
                raise EvalError(f"{where}: 'input_ids' holds ids outside the tokenizer's vocabulary (0..{vocab - 1})")
            out.append(list(rec["input_ids"]))
            continue
        is_chat = "messages" in rec or "conversations" in rec
        if not is_chat and "prompt" not in rec:  # {"text": ...}
            out.append(encode_text(tokenizer, str(rec["text"])))
            continue
        if is_chat:
            messages, tools = _chat_messages(rec, where)
        elif isinstance(rec["prompt"], list):
            messages, tools = _chat_messages({"messages": rec["prompt"]}, where)
        elif template:
            messages, tools = [{"role": "user", "content": str(rec["prompt"])}], None
        else:
            out.append(encode_text(tokenizer, str(rec["prompt"])))
            continue
        tpl = resolve_chat_template(tokenizer, template)
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=tpl, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # the template rejected the record (jinja raise_exception)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvalError(f"{where}: the chat template rejected this prompt: {msg}") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise EvalError(f"{where}: the prompt tokenizes to nothing")
        out.append(ids)
    return out


def load_tokenizer(target: Any) -> Any:
    """The target's tokenizer: the one `target` carries, else the one in its directory."""
    from transformers import AutoTokenizer

    tok = getattr(target, "tokenizer", None)
    return tok if tok is not None else AutoTokenizer.from_pretrained(str(target.path))


def stop_token_ids(target: Any, tokenizer: Any = None) -> list[int]:
    """The ids that end a generation, as vLLM uses them: generation_config eos ids + tokenizer eos."""
    return _stop_ids(getattr(target.model, "generation_config", None), target.model.config, tokenizer)


def stop_token_ids_of(model_dir: str | Path, tokenizer: Any = None) -> list[int]:
    """`stop_token_ids` of a model directory, without loading its weights (a process that only drives vLLM)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the model config's eos
        gen = None
    return _stop_ids(gen, AutoConfig.from_pretrained(model_dir), tokenizer)


def _stop_ids(gen: Any, config: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tok_eos is not None:
        ids.append(int(tok_eos))
    return sorted({int(i) for i in ids})
