"""Stage 2 — chat templates and loss masks: one record → token ids + the assistant mask.

The target's chat template renders each record; the loss mask marks exactly the assistant tokens,
each assistant turn in the form the model generates it at serving time (after its history as the
template renders it; docs/conventions.md). When the template renders every turn that way inside the
full conversation (incremental templates: Llama-3.1, ChatML) the record is one example
(``one_rendering``); when it rewrites earlier turns (Qwen3 strips their reasoning, some templates move
the system prompt) the record becomes one example per distinct rendering (``per_turn``). Spans come
from ``{% generation %}`` blocks when the template has them, else from prefix rendering.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peagle.data.chat import reasoning_of, template_messages
from peagle.data.records import DataError, read_text

# Drop reasons (counted in the manifest and the summary).
NO_ASSISTANT = "no_assistant"
TOO_LONG = "too_long"
PROMPT_TOO_LONG = "prompt_longer_than_max_length"
NO_SUPERVISED = "no_supervised_tokens"
TEMPLATE_ERROR = "template_error"
TEMPLATE_NOT_INCREMENTAL = "template_not_incremental"  # not even one turn's serving form is locatable

# How a record was turned into examples (manifest "tokenization", summary).
ONE_RENDERING = "one_rendering"  # every assistant turn appears in the full rendering as generated
PER_TURN = "per_turn"  # the template rewrites earlier turns: one example per distinct rendering
GENERATION_FULL = "generation_full_rendering"  # serving forms not locatable: {% generation %} spans of
#                                                the full rendering (earlier turns as the template shows them)


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
    whole, and for the text / token-id records of ``peagle.data.text``, which ``prepare`` wraps in
    it too); ``reasoning_not_rendered``: assistant turns whose reasoning the template never shows.
    """

    examples: list[TokenizedExample]
    strategy: str | None = None
    reasoning_not_rendered: int = 0


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_blocks(template: str) -> bool:
    """True when the template marks assistant text with ``{% generation %}`` blocks."""
    return bool(_GENERATION_TAG.search(template))


def load_chat_template(chat_template: str | Path | None) -> str | None:
    """A template given as a file path (``--chat-template FILE``) or as the template text itself."""
    if chat_template is None:
        return None
    p = Path(chat_template)
    try:
        if p.is_file():
            text = read_text(p)
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
    has_gen = has_generation_blocks(template)
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
