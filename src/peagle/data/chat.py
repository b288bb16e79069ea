"""Chat messages in every form the OpenAI chat format allows, normalised for a chat template.

Chat templates read ``message.content`` as a string; datasets hold what the OpenAI API accepts and
returns. :func:`normalize_message` turns one message into what templates expect, the way vLLM does
before it renders a request, so a draft is trained on the text it will be served:

- ``content`` as a list of parts: the text parts (``text``, ``input_text``, ``output_text``,
  ``refusal``; bare strings) joined with ``"\\n"`` (vLLM's "string" content format); any other part
  (``image_url``, ``input_audio``, ``file``, ...) is an error: peagle drafts are trained on text;
- ``content`` null or absent: allowed on an assistant turn with ``tool_calls`` (becomes ``""``),
  an error anywhere else; a number, boolean or object is an error (never rendered as ``"5"``);
- ``tool_calls[].function.arguments`` given as a JSON string (as the API returns it): parsed to an
  object, so ``arguments | tojson`` templates do not double-encode it (vLLM does the same);
  ``tool_calls`` as a JSON string: parsed; the legacy ``function_call`` becomes ``tool_calls``;
- reasoning under ``reasoning_content``, ``reasoning`` or ``thinking``: one value, kept as
  ``reasoning_content`` (what Qwen3 / DeepSeek templates read); :func:`template_messages` also
  passes it as ``reasoning`` / ``thinking`` to a template that reads those names (gpt-oss);
- a tool result given as a JSON object: its JSON text.

Errors are :class:`ChatFormatError` (a ValueError) with a one-line message naming the message index,
role and field, and a ``reason`` (the bucket ``prepare --on-error skip`` counts them under).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BAD_CONTENT",
    "BAD_TOOL_CALL",
    "NON_TEXT_CONTENT",
    "REASONING_FIELDS",
    "TEXT_PART_TYPES",
    "ChatFormatError",
    "content_text",
    "normalize_message",
    "reasoning_of",
    "template_messages",
]

TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal"})
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")

# reasons (counted by prepare --on-error skip)
BAD_CONTENT = "bad_content"
NON_TEXT_CONTENT = "non_text_content"
BAD_TOOL_CALL = "bad_tool_call"


class ChatFormatError(ValueError):
    """A message whose content or tool calls are not a valid OpenAI chat form (``reason``: bucket)."""

    def __init__(self, message: str, reason: str = BAD_CONTENT) -> None:
        super().__init__(message)
        self.reason = reason


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", dict: "an object"}.get(
        type(v), type(v).__name__)


def content_text(content: Any, what: str, *, allow_missing: bool = False) -> str:
    """The text of one ``content`` value (string or list of text parts); ``what`` names it in errors."""
    if isinstance(content, str):
        return content
    if content is None:
        if allow_missing:
            return ""
        raise ChatFormatError(f"{what} has no content (null content is only allowed on an assistant turn "
                              "with tool_calls)")
    if isinstance(content, Mapping) and "type" in content:  # a single part instead of a list
        content = [content]
    if not isinstance(content, list):
        raise ChatFormatError(f"{what}: content must be a string or a list of text parts, got "
                              f"{_type_name(content)} ({json.dumps(content, default=str)[:40]})")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise ChatFormatError(f"{what}: content part {j} must be an object with a 'type' "
                                  f"(got {_type_name(part)})")
        kind = part["type"]
        if kind not in TEXT_PART_TYPES:
            raise ChatFormatError(f"{what}: content part {j} has type {kind!r}; peagle trains on text "
                                  f"only (text parts: {', '.join(sorted(TEXT_PART_TYPES))})", NON_TEXT_CONTENT)
        key = "refusal" if kind == "refusal" and "text" not in part else "text"
        text = part.get(key)
        if not isinstance(text, str):
            raise ChatFormatError(f"{what}: content part {j} ({kind}) needs a string {key!r}, got "
                                  f"{_type_name(text) if text is not None else 'none'}")
        texts.append(text)
    return "\n".join(texts)


def _parse_json_string(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ChatFormatError(f"{what} is a string that is not valid JSON ({e.msg} at column {e.colno})",
                              BAD_TOOL_CALL) from None


def _tool_calls(calls: Any, what: str) -> list[dict[str, Any]]:
    calls = _parse_json_string(calls, f"{what} tool_calls")
    if isinstance(calls, Mapping):
        calls = [calls]
    if not isinstance(calls, list):
        raise ChatFormatError(f"{what}: tool_calls must be a list, got {_type_name(calls)}", BAD_TOOL_CALL)
    out = []
    for k, call in enumerate(calls):
        here = f"{what} tool_calls[{k}]"
        if not isinstance(call, Mapping):
            raise ChatFormatError(f"{here} must be an object, got {_type_name(call)}", BAD_TOOL_CALL)
        call = dict(call)
        fn = call.get("function", call if "name" in call and "function" not in call else None)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"{here} needs function.name (a string)", BAD_TOOL_CALL)
        fn = dict(fn)
        if "arguments" in fn:
            args = fn["arguments"]
            args = {} if args is None or (isinstance(args, str) and not args.strip()) else args  # no arguments
            fn["arguments"] = _parse_json_string(args, f"{here}.function.arguments")
        elif "parameters" in fn:  # some datasets name them like Llama's rendering
            fn["arguments"] = _parse_json_string(fn.pop("parameters"), f"{here}.function.parameters")
        else:
            fn["arguments"] = {}
        if "function" in call:
            call["function"] = fn
        else:
            call = {"type": "function", "function": fn}
        call.setdefault("type", "function")
        out.append(call)
    return out


def reasoning_of(message: Mapping[str, Any]) -> str | None:
    """The reasoning text of a message, under whichever of REASONING_FIELDS it is given (or None)."""
    for key in REASONING_FIELDS:
        if message.get(key) is not None:
            return message[key]
    return None


def normalize_message(message: Mapping[str, Any], index: int, role: str) -> dict[str, Any]:
    """One message in the form chat templates expect (see the module docstring); ``role`` already
    validated/mapped. None-valued keys are dropped; raises :class:`ChatFormatError`."""
    what = f"message {index} ({role})"
    msg = {k: v for k, v in message.items() if v is not None}
    msg["role"] = role
    if role == "assistant":
        if "function_call" in msg and "tool_calls" not in msg:  # legacy OpenAI form
            msg["tool_calls"] = [{"type": "function", "function": msg.pop("function_call")}]
        if "tool_calls" in msg:
            msg["tool_calls"] = _tool_calls(msg["tool_calls"], what)
            if not msg["tool_calls"]:
                del msg["tool_calls"]
    has_calls = bool(msg.get("tool_calls"))
    content = message.get("content")
    if role == "tool" and isinstance(content, Mapping) and "type" not in content:
        content = json.dumps(content, ensure_ascii=False)  # a structured tool result, as its JSON
    msg["content"] = content_text(content, what, allow_missing=has_calls)
    values = {key: content_text(msg.pop(key), f"{what} {key}") for key in REASONING_FIELDS if key in msg}
    if values:
        distinct = set(values.values())
        if len(distinct) > 1:
            raise ChatFormatError(f"{what}: {' and '.join(sorted(values))} hold different reasoning texts")
        msg["reasoning_content"] = distinct.pop()
    return msg


def template_messages(messages: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Messages as ``template`` reads them: the reasoning (kept as ``reasoning_content``) is also
    given as ``reasoning`` / ``thinking`` when the template reads those names."""
    aliases = [k for k in REASONING_FIELDS[1:] if re.search(rf"\b{k}\b", template)]
    if not aliases:
        return messages
    out = []
    for m in messages:
        if m.get("reasoning_content") is not None:
            m = {**m, **{k: m["reasoning_content"] for k in aliases if k not in m}}
        out.append(m)
    return out
