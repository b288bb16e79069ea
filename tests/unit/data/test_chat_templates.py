"""Chat templates that rewrite earlier turns: every assistant turn supervised as it is generated.

Three template families, written here after the behaviour of the real ones (tiny tokenizers built
locally): Qwen3-style (reasoning of turns before the last user query stripped, ``<tool_call>``
blocks, tool responses grouped in a user turn), Llama-3.1-style (incremental: one rendering holds
every turn), Mistral-style (the system prompt moves into the LAST user message, so the history's
rendering changes in another way). Supervised tokens are decoded and compared with hand-written
strings.
"""

from __future__ import annotations

import json

import pytest
from conftest import build_chat_tokenizer

from peagle.data import (
    ONE_RENDERING,
    PER_TURN,
    TEMPLATE_NOT_INCREMENTAL,
    DataError,
    load_prepared,
    prepare,
    tokenize_chat,
    tokenize_chat_examples,
)
from peagle.data import normalize_record as _normalise

# ---------------------------------------------------------------------------------- templates

QWEN3_STYLE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- '# Tools\n<tools>' }}
    {%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1, scanning=true) %}
{%- for m in messages[::-1] %}
    {%- if ns.scanning and m.role == 'user' %}
        {%- set ns.scanning = false %}
        {%- set ns.last_query = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for m in messages %}
    {%- set content = m.content if m.content is string else '' %}
    {%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- GEN %}
        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
            {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- for tc in m.tool_calls or [] %}
            {%- if content or not loop.first %}{{- '\n' }}{%- endif %}
            {%- set f = tc.function if tc.function else tc %}
            {{- '<tool_call>\n{"name": "' + f.name + '", "arguments": ' }}
            {{- f.arguments if f.arguments is string else f.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}
        {%- ENDGEN %}
        {{- '\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""
QWEN3_PLAIN = QWEN3_STYLE.replace("{%- GEN %}", "").replace("{%- ENDGEN %}", "")
QWEN3_GENERATION = QWEN3_STYLE.replace("{%- GEN %}", "{%- generation %}").replace(
    "{%- ENDGEN %}", "{%- endgeneration %}")
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                  "</tool_call>", "<tool_response>", "</tool_response>"]

LLAMA31_STYLE = r"""
{{- bos_token }}
{%- set date_string = date_string if date_string is defined else '26 Jul 2024' %}
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if tools %}{{- 'Environment: ipython\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' }}
{%- if tools %}
    {%- for t in tools %}{{- t | tojson + '\n\n' }}{%- endfor %}
{%- endif %}
{{- system + '<|eot_id|>' }}
{%- for m in messages %}
    {%- if m.role == 'assistant' and m.tool_calls %}
        {%- if m.tool_calls | length != 1 %}
            {{- raise_exception('This model only supports single tool-calls at once!') }}
        {%- endif %}
        {%- set f = m.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + f.name + '", "parameters": ' }}
        {{- f.arguments | tojson }}
        {{- '}<|eot_id|>' }}
    {%- elif m.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {%- if m.content is mapping %}{{- m.content | tojson }}{%- else %}{{- m.content }}{%- endif %}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""
LLAMA31_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"]

# Mistral-style: no generation prompt, the system prompt goes into the last user message.
MISTRAL_STYLE = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in loop_messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in loop_messages %}
    {%- if m.role == 'user' %}
        {%- if system and loop.index0 == ns.last_user %}
            {{- '[INST] ' + system + '\n\n' + m.content + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + m.content + '[/INST]' }}
        {%- endif %}
    {%- elif m.role == 'assistant' %}
        {{- ' ' + m.content + eos_token }}
    {%- endif %}
{%- endfor %}
"""
MISTRAL_SPECIALS = ["<s>", "</s>", "[INST]", "[/INST]"]


@pytest.fixture(scope="module")
def qwen3_tok_dir(tmp_path_factory):
    return build_chat_tokenizer(tmp_path_factory.mktemp("qwen3_style"), QWEN3_PLAIN, QWEN3_SPECIALS,
                                eos="<|im_end|>", pad="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen3_tok(qwen3_tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tok_dir)


@pytest.fixture(scope="module")
def llama31_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = build_chat_tokenizer(tmp_path_factory.mktemp("llama31_style"), LLAMA31_STYLE, LLAMA31_SPECIALS,
                             bos="<|begin_of_text|>", eos="<|eot_id|>")
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def mistral_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = build_chat_tokenizer(tmp_path_factory.mktemp("mistral_style"), MISTRAL_STYLE, MISTRAL_SPECIALS,
                             bos="<s>", eos="</s>")
    return AutoTokenizer.from_pretrained(d)


def supervised(tok, ex):
    """Decoded runs of supervised tokens."""
    runs, cur = [], []
    for i, m in zip(ex.input_ids, ex.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def record(obj):
    """Through the reader's normalisation, as prepare sees it."""
    r = _normalise(obj, "chats.jsonl", 1)
    return r.messages, r.tools


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}

TOOL_CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "count from 3 to 9"},
        {"role": "assistant", "reasoning_content": "Start at 3.", "content": "3 4 5 6 7 8 9"},
        {"role": "user", "content": [{"type": "text", "text": "what is the weather"},
                                     {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "reasoning": "Call the tool.", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "assistant", "content": "<think>\nIt is 18 C.\n</think>\n\nIt is 18 C in Paris."},
    ],
    "tools": [WEATHER_TOOL],
}

TOOLS_JSON = json.dumps(WEATHER_TOOL, ensure_ascii=False)
QWEN3_HEADER = ("<|im_start|>system\nAnswer briefly.\n\n# Tools\n<tools>\n" + TOOLS_JSON
                + "\n</tools><|im_end|>\n<|im_start|>user\ncount from 3 to 9<|im_end|>\n")


# ---------------------------------------------------------------------------------- Qwen3-style


@pytest.mark.parametrize("template", ["plain", "generation"])
def test_qwen3_reasoning_tool_calls_each_turn_as_generated(qwen3_tok, template):
    tpl = QWEN3_PLAIN if template == "plain" else QWEN3_GENERATION
    msgs, tools = record(TOOL_CHAT)
    out = tokenize_chat_examples(qwen3_tok, msgs, 4096, chat_template=tpl, tools=tools)
    assert out.strategy == PER_TURN and out.reasoning_not_rendered == 0
    assert [e.drop_reason for e in out.examples] == [None, None]
    first, second = out.examples

    # Example 1: the first turn as the model generated it (with its reasoning), after its history.
    assert qwen3_tok.decode(first.input_ids) == (
        QWEN3_HEADER + "<|im_start|>assistant\n<think>\nStart at 3.\n</think>\n\n3 4 5 6 7 8 9<|im_end|>\n")
    assert supervised(qwen3_tok, first) == ["<think>\nStart at 3.\n</think>\n\n3 4 5 6 7 8 9<|im_end|>"]

    # Example 2: the full chat; turn 1 is history there (reasoning stripped, not supervised); the
    # tool-call turn and the final answer keep their reasoning (after the last user query) and are
    # supervised; text parts joined with a newline; arguments parsed, not double-encoded.
    assert qwen3_tok.decode(second.input_ids) == (
        QWEN3_HEADER
        + "<|im_start|>assistant\n3 4 5 6 7 8 9<|im_end|>\n"
        + "<|im_start|>user\nwhat is the weather\nin Paris?<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\nCall the tool.\n</think>\n\n<tool_call>\n"
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        + "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n"
        + "<|im_start|>assistant\n<think>\nIt is 18 C.\n</think>\n\nIt is 18 C in Paris.<|im_end|>\n"
    )
    assert supervised(qwen3_tok, second) == [
        '<think>\nCall the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\nIt is 18 C.\n</think>\n\nIt is 18 C in Paris.<|im_end|>",
    ]

    # Only the last turn: one example, the full rendering, only the final answer supervised.
    last = tokenize_chat_examples(qwen3_tok, msgs, 4096, chat_template=tpl, tools=tools, last_turn_only=True)
    assert last.strategy == ONE_RENDERING and len(last.examples) == 1
    assert last.examples[0].input_ids == second.input_ids
    assert supervised(qwen3_tok, last.examples[0]) == [
        "<think>\nIt is 18 C.\n</think>\n\nIt is 18 C in Paris.<|im_end|>"]


def test_qwen3_plain_multi_turn_and_template_kwargs(qwen3_tok):
    chat = [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"},
            {"role": "user", "content": "what is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19"}]
    out = tokenize_chat_examples(qwen3_tok, chat, 4096)
    assert out.strategy == PER_TURN
    # In thinking mode the model opens an (empty) think block: that is what it generates.
    assert [supervised(qwen3_tok, e) for e in out.examples] == [
        ["<think>\n\n</think>\n\n3 4 5 6 7 8 9<|im_end|>"], ["<think>\n\n</think>\n\n12 + 7 = 19<|im_end|>"]]
    assert qwen3_tok.decode(out.examples[1].input_ids).startswith(
        "<|im_start|>user\ncount from 3 to 9<|im_end|>\n<|im_start|>assistant\n3 4 5 6 7 8 9<|im_end|>\n")
    # enable_thinking=false: the server writes the empty think block in the prompt; only the answer
    # is generated, hence supervised.
    off = tokenize_chat_examples(qwen3_tok, chat, 4096, template_kwargs={"enable_thinking": False})
    assert [supervised(qwen3_tok, e) for e in off.examples] == [["3 4 5 6 7 8 9<|im_end|>"],
                                                                ["12 + 7 = 19<|im_end|>"]]
    with pytest.raises(DataError, match="tokenize_chat_examples"):
        tokenize_chat(qwen3_tok, chat, 4096)


def test_reasoning_the_template_does_not_render_is_reported(llama31_tok):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "why"}]
    out = tokenize_chat_examples(llama31_tok, chat, 4096)
    assert out.reasoning_not_rendered == 1 and out.examples[0].drop_reason is None


def test_prepare_qwen3_sharegpt_keeps_every_chat(qwen3_tok_dir, tmp_path):
    # The case: a ShareGPT file under a Qwen3-style template kept 0 of 30 chats.
    src = tmp_path / "sharegpt.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"count from {i} to 9"},
                               {"from": "gpt", "value": "3 4 5 6 7 8 9"},
                               {"from": "human", "value": "what is 12 + 7?"},
                               {"from": "gpt", "value": "12 + 7 = 19"}]} for i in range(30)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    V = 512  # the target's embedding has spare rows past the tokenizer (as Qwen3's does): auto mask token
    s = prepare(src, qwen3_tok_dir, tmp_path / "out", max_length=256, vocab_size=V, progress=False)
    assert (s.read, s.records_kept, s.kept) == (30, 30, 60) and s.dropped == {}
    assert s.strategies == {PER_TURN: 30}
    text = s.format_summary()
    assert "examples kept: 60 from 30 records" in text
    assert "per_turn: 30 records (template rewrites earlier turns: one example per distinct rendering)" in text
    m = load_prepared(tmp_path / "out").manifest
    assert m["tokenization"]["records_by_strategy"] == {PER_TURN: 30}
    assert m["tokenization"]["spans"] == "prefix"
    last = prepare(src, qwen3_tok_dir, tmp_path / "last", max_length=256, last_turn_only=True, vocab_size=V,
                   progress=False)
    assert last.kept == 30


# ---------------------------------------------------------------------------------- Llama-3.1-style


def test_llama31_one_rendering_with_tool_call_and_text_parts(llama31_tok):
    msgs, tools = record({
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [{"type": "text", "text": "count from 3 to 9"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "3 4 5 6 7 8 9"}]},
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "x", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "content": "18 C"},
            {"role": "assistant", "content": "It is 18 C in Paris."},
        ],
        "tools": [WEATHER_TOOL]})
    out = tokenize_chat_examples(llama31_tok, msgs, 4096, tools=tools)
    assert out.strategy == ONE_RENDERING and len(out.examples) == 1
    ex = out.examples[0]
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert llama31_tok.decode(ex.input_ids) == (
        "<|begin_of_text|>" + h.format("system") + "Environment: ipython\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n" + TOOLS_JSON + "\n\nAnswer briefly.<|eot_id|>"
        + h.format("user") + "count from 3 to 9<|eot_id|>"
        + h.format("assistant") + "3 4 5 6 7 8 9<|eot_id|>"
        + h.format("user") + "weather in Paris?<|eot_id|>"
        + h.format("assistant") + '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        + h.format("ipython") + "18 C<|eot_id|>"
        + h.format("assistant") + "It is 18 C in Paris.<|eot_id|>"
    )
    assert supervised(llama31_tok, ex) == ["3 4 5 6 7 8 9<|eot_id|>",
                                           '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                           "It is 18 C in Paris.<|eot_id|>"]


# ---------------------------------------------------------------------------------- Mistral-style


def test_mistral_system_prompt_moving_to_last_user_turn(mistral_tok):
    chat = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"},
            {"role": "user", "content": "what is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19"}]
    out = tokenize_chat_examples(mistral_tok, chat, 4096)
    assert out.strategy == PER_TURN
    a, b = out.examples
    # Served after turn 1's prompt, the system prompt sits in the first user message...
    assert mistral_tok.decode(a.input_ids) == "<s>[INST] Answer briefly.\n\ncount from 3 to 9[/INST] 3 4 5 6 7 8 9</s>"
    assert supervised(mistral_tok, a) == [" 3 4 5 6 7 8 9</s>"]
    # ...in the full chat it moved to the last one: turn 1 is history there, only turn 2 supervised.
    assert mistral_tok.decode(b.input_ids) == (
        "<s>[INST] count from 3 to 9[/INST] 3 4 5 6 7 8 9</s>[INST] Answer briefly.\n\nwhat is 12 + 7?[/INST] "
        "12 + 7 = 19</s>")
    assert supervised(mistral_tok, b) == [" 12 + 7 = 19</s>"]
    # Without a system prompt the template is incremental: one example, both turns.
    one = tokenize_chat_examples(mistral_tok, chat[1:], 4096)
    assert one.strategy == ONE_RENDERING
    assert supervised(mistral_tok, one.examples[0]) == [" 3 4 5 6 7 8 9</s>", " 12 + 7 = 19</s>"]


def test_template_whose_history_is_never_a_prefix_is_dropped_with_a_reason(mistral_tok):
    tpl = "{{ messages|length }}" + MISTRAL_STYLE
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    out = tokenize_chat_examples(mistral_tok, chat, 64, chat_template=tpl)
    ex = out.examples[0]
    assert ex.drop_reason == TEMPLATE_NOT_INCREMENTAL
    assert "first difference at character 0: '1<s>[INST] q[/INST]' vs '2<s>[INST] q[/INST] a</s>'" in ex.error
    assert "{% generation %}" in ex.error


def test_per_turn_examples_record_their_source_record(qwen3_tok_dir, tmp_path):
    chat = [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"},
            {"role": "user", "content": "what is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19"}]
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"messages": chat[:2]}) + "\n" + json.dumps({"messages": chat}) + "\n")
    prepare(src, qwen3_tok_dir, tmp_path / "out", vocab_size=512, progress=False)
    data = load_prepared(tmp_path / "out")
    assert [data[i]["record"] for i in range(len(data))] == [0, 1, 1]  # the 2-turn chat gave 2 examples
