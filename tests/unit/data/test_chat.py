"""peagle.chat: every OpenAI content form, normalised as vLLM does before rendering; clear errors."""

from __future__ import annotations

import json

import pytest

from peagle.data import UNKNOWN_ROLE, RecordError, read_records
from peagle.data.chat import BAD_CONTENT, BAD_TOOL_CALL, NON_TEXT_CONTENT, ChatFormatError, template_messages


def _read(tmp_path, *records):
    p = tmp_path / "chats.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p, [r.messages for r in read_records(p)]


def _error(tmp_path, record, line=2):
    """The RecordError a bad record (written at ``line``) raises, and the file it was read from."""
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [ok] * (line - 1) + [record]))
    with pytest.raises(RecordError) as e:
        list(read_records(p))
    assert str(e.value).startswith(f"{p}:{line}: ") and "\n" not in str(e.value)
    return e.value


def test_text_parts_are_joined_with_a_newline(tmp_path):
    _, (msgs,) = _read(tmp_path, {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}, "c"]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "d"}, {"type": "refusal", "refusal": "e"}]},
        {"role": "user", "content": {"type": "text", "text": "single part"}},
        {"role": "assistant", "content": []},
    ]})
    assert [m["content"] for m in msgs] == ["Be brief.", "a\nb\nc", "d\ne", "single part", ""]


def test_tool_calls_arguments_string_parsed_null_content_and_legacy_forms(tmp_path):
    _, (msgs,) = _read(tmp_path, {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": {"temp": 18}},
        {"role": "function", "name": "now", "content": "noon"},
        {"role": "assistant", "function_call": {"name": "now", "arguments": "{}"}},
        {"role": "assistant", "content": "18 C at noon"},
    ]})
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "c2", "type": "function", "function": {"name": "now", "arguments": {}}}]}
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'}
    assert msgs[3] == {"role": "tool", "name": "now", "content": "noon"}
    assert msgs[4] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "now", "arguments": {}}}]}
    # tool_calls stored as a JSON string (some datasets) are parsed too
    _, (m2,) = _read(tmp_path, {"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "tool_calls": json.dumps([{"function": {"name": "f", "arguments": '{"x": 1}'}}])}]})
    assert m2[1]["tool_calls"] == [{"function": {"name": "f", "arguments": {"x": 1}}, "type": "function"}]


def test_reasoning_fields_mapped_to_reasoning_content(tmp_path):
    _, (a, b) = _read(
        tmp_path,
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x", "reasoning": "r1"}]},
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "x", "thinking": "r2", "reasoning_content": "r2"}]},
    )
    assert a[1] == {"role": "assistant", "content": "x", "reasoning_content": "r1"}
    assert b[1] == {"role": "assistant", "content": "x", "reasoning_content": "r2"}
    # a template that reads `thinking` (gpt-oss) or `reasoning` gets it under that name as well
    got = template_messages(a, "{{ message.thinking }}")
    assert got[1] == {"role": "assistant", "content": "x", "reasoning_content": "r1", "thinking": "r1"}
    assert template_messages(a, "{{ message.reasoning_content }}") is a
    e = _error(tmp_path, {"messages": [{"role": "assistant", "content": "x", "reasoning": "a",
                                        "reasoning_content": "b"}]})
    assert "message 0 (assistant): reasoning and reasoning_content hold different reasoning texts" in str(e)


@pytest.mark.parametrize(
    ("message", "reason", "text"),
    [
        ({"role": "user", "content": 5}, BAD_CONTENT,
         "message 0 (user): content must be a string or a list of text parts, got a number (5)"),
        ({"role": "user", "content": True}, BAD_CONTENT, "got a boolean (true)"),
        ({"role": "user", "content": {"text": "hi"}}, BAD_CONTENT, "got an object"),
        ({"role": "user", "content": None}, BAD_CONTENT,
         "message 0 (user) has no content (null content is only allowed on an assistant turn with tool_calls)"),
        ({"role": "assistant", "content": None}, BAD_CONTENT, "message 0 (assistant) has no content"),
        ({"role": "user"}, BAD_CONTENT, "message 0 (user) has no content"),
        ({"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url":
                                                                        {"url": "http://x/y.png"}}]},
         NON_TEXT_CONTENT, "message 0 (user): content part 1 has type 'image_url'; peagle trains on text only"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]}, NON_TEXT_CONTENT,
         "content part 0 has type 'input_audio'"),
        ({"role": "user", "content": [{"type": "text", "text": 3}]}, BAD_CONTENT,
         "content part 0 (text) needs a string 'text', got a number"),
        ({"role": "user", "content": [{"text": "no type"}]}, BAD_CONTENT,
         "content part 0 must be an object with a 'type'"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}, BAD_TOOL_CALL,
         "message 0 (assistant) tool_calls[0].function.arguments is a string that is not valid JSON"),
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, BAD_TOOL_CALL,
         "tool_calls[0] needs function.name"),
        ({"role": "assistant", "tool_calls": 7}, BAD_TOOL_CALL, "tool_calls must be a list, got a number"),
        ({"role": "wizard", "content": "x"}, UNKNOWN_ROLE, "unknown role 'wizard'"),
    ],
)
def test_malformed_content_is_one_error_naming_file_and_line(tmp_path, message, reason, text):
    e = _error(tmp_path, {"messages": [message]}, line=3)
    assert e.reason == reason and e.line == 3
    assert text in str(e)


def test_sharegpt_turn_without_value_is_an_error(tmp_path):
    e = _error(tmp_path, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]})
    assert "message 1 (assistant) has no content" in str(e)


def test_top_level_system_prompt(tmp_path):
    _, (msgs,) = _read(tmp_path, {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert msgs[0] == {"role": "system", "content": "Be brief."}


def test_chat_format_error_is_a_value_error():
    assert issubclass(ChatFormatError, ValueError) and issubclass(RecordError, ValueError)
