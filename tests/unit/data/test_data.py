"""peagle.data: reading chat records, chat-template loss masks, prepare, packing, the EAGLE shift."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHATS

from peagle.data import (
    NO_ASSISTANT,
    PROMPT_TOO_LONG,
    TEMPLATE_ERROR,
    TEMPLATE_NOT_INCREMENTAL,
    TOO_LONG,
    DataError,
    SplitSpec,
    cod_seed,
    cod_seeds,
    collate,
    eagle_shift,
    load_prepared,
    pack,
    positions_in_document,
    prepare,
    read_records,
    tokenize_chat,
)
from peagle.demo.offline_models import CHAT_TEMPLATE
from peagle.target.hf import embedding_rows

PLAIN_TEMPLATE = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")


def _runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# ------------------------------------------------------------------ the EAGLE shift


def test_eagle_shift_hand_written_example():
    # One row: document 0 = 4 tokens, document 1 = 3 tokens, one padding slot.
    x = torch.tensor([10, 11, 12, 13, 20, 21, 22, 0])
    doc = torch.tensor([0, 0, 0, 0, 1, 1, 1, -1])
    l = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0])
    g = torch.arange(8, dtype=torch.float32)[:, None]  # aux g_j = j
    y = 100 + torch.arange(8, dtype=torch.float32)[:, None]  # final y_j = 100 + j
    s = eagle_shift(x, l, doc, g, y)
    assert s.input_ids.tolist() == [11, 12, 13, 0, 21, 22, 0, 0]
    assert s.loss_mask.long().tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert s.document_ids.tolist() == [0, 0, 0, -1, 1, 1, -1, -1]
    assert s.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 0, 0]
    assert s.aux_hidden[:, 0].tolist() == [0, 1, 2, 0, 4, 5, 0, 0]
    assert s.target_hidden[:, 0].tolist() == [101, 102, 103, 0, 105, 106, 0, 0]

    # Batched [B, n] gives the same per row; a second row with one full-length document.
    x2 = torch.stack([x, torch.arange(30, 38)])
    doc2 = torch.stack([doc, torch.zeros(8, dtype=torch.long)])
    l2 = torch.stack([l, torch.ones(8, dtype=torch.long)])
    s2 = eagle_shift(x2, l2, doc2, torch.stack([g, g]), torch.stack([y, y]),
                     example_index=torch.stack([doc + 5, torch.full((8,), 9)]))
    assert torch.equal(s2.input_ids[0], s.input_ids)
    assert s2.input_ids[1].tolist() == [31, 32, 33, 34, 35, 36, 37, 0]
    assert s2.loss_mask[1].long().tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    assert s2.document_ids[1].tolist() == [0] * 7 + [-1]
    assert s2.example_index.tolist() == [[5, 5, 5, -1, 6, 6, -1, -1], [9] * 7 + [-1]]


def test_eagle_shift_single_document_matches_speculators_convention():
    # For one unpacked document: input_ids = x[1:], hidden = g[:-1], final = y[1:], loss = l[1:].
    torch.manual_seed(0)
    n = 9
    x, l = torch.randint(0, 50, (n,)), torch.randint(0, 2, (n,))
    g, y = torch.randn(n, 6), torch.randn(n, 2)
    s = eagle_shift(x, l, torch.zeros(n, dtype=torch.long), g, y)
    assert torch.equal(s.input_ids[:-1], x[1:])
    assert torch.equal(s.aux_hidden[:-1], g[:-1])
    assert torch.equal(s.target_hidden[:-1], y[1:])
    assert torch.equal(s.loss_mask[:-1].long(), l[1:])
    assert s.document_ids[-1] == -1 and not s.loss_mask[-1]


def test_positions_in_document():
    doc = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 2, 2, -1, -1]])
    assert positions_in_document(doc).tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 0, 0]]


# ------------------------------------------------------------------ packing and seeds


def test_pack_first_fit_hand_example():
    rows = pack([5, 3, 6, 2, 4, 1], 8)
    # 5 → row0 (3 left); 3 → row0 (0); 6 → row1 (2); 2 → row1 (0); 4 → row2 (4); 1 → row2 (3)
    assert rows == [[0, 1], [2, 3], [4, 5]]
    assert pack([5, 3, 6, 2, 4, 1], 8) == rows  # deterministic


def test_pack_seeded_is_deterministic_and_complete():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 33, (200,), generator=g).tolist()
    a, b = pack(lengths, 64, seed=3), pack(lengths, 64, seed=3)
    assert a == b and a != pack(lengths, 64, seed=4)
    flat = sorted(i for r in a for i in r)
    assert flat == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in a)
    with pytest.raises(ValueError, match="outside"):
        pack([3, 70], 64)


def test_collate_rows():
    exs = [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4, 5], "loss_mask": [1, 1]}]
    p = collate(exs, [[1, 0], [0]], 6, pad_token_id=9)
    assert p.input_ids.tolist() == [[4, 5, 1, 2, 3, 9], [1, 2, 3, 9, 9, 9]]
    assert p.loss_mask.long().tolist() == [[1, 1, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]]
    assert p.document_ids.tolist() == [[0, 0, 1, 1, 1, -1], [0, 0, 0, -1, -1, -1]]
    assert p.example_index.tolist() == [[1, 1, 0, 0, 0, -1], [0, 0, 0, -1, -1, -1]]
    assert p.position_ids.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0]]


def test_cod_seed_stable():
    s = cod_seed(1234, 2, 77)
    assert s == cod_seed(1234, 2, 77) and 0 <= s < 2**63
    assert len({cod_seed(1234, e, i) for e in range(3) for i in range(50)}) == 150
    assert cod_seed(0, 0, 0) == 393751907897447445  # pinned: seeds must not change across versions
    idx = torch.tensor([[3, 3, 5, -1]])
    out = cod_seeds(idx, 1234, 2)
    assert out.tolist() == [[cod_seed(1234, 2, 3)] * 2 + [cod_seed(1234, 2, 5), 0]]


# ------------------------------------------------------------------ reading records


def test_read_formats(tmp_path):
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo", "reasoning_content": "think", "tool_calls": None}]
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": msgs}) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps([{"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    recs = list(read_records([tmp_path / "a.jsonl", tmp_path / "b.json"]))
    assert recs[0].messages[1] == {"role": "assistant", "content": "yo", "reasoning_content": "think"}
    assert (recs[0].source, recs[0].line) == (str(tmp_path / "a.jsonl"), 1)
    assert [m["role"] for m in recs[1].messages] == ["system", "user", "assistant"]
    assert recs[1].messages[2]["content"] == "a"

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = [{"messages": c} for c in CHATS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert [r.messages for r in read_records(tmp_path / "c.parquet")] == CHATS
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(
        str(tmp_path / "ds"))
    assert len(list(read_records(tmp_path / "ds"))) == 4
    assert len(list(read_records(tmp_path / "ds", split="test"))) == 1
    got = [r.messages for r in read_records(tmp_path / "ds", split="train[1:3]")]
    assert got == CHATS[1:3]


def test_split_and_limit(chat_jsonl):
    def n(**kw):
        return [r.line for r in read_records(chat_jsonl, **kw)]

    assert n() == [1, 2, 3, 4]
    assert n(split="train[:2]") == [1, 2]
    assert n(split="[1:]", limit=2) == [2, 3]
    assert n(split="train[:50%]") == [1, 2]
    assert n(split="[-1:]") == [4]
    assert n(limit=3) == [1, 2, 3]
    with pytest.raises(DataError, match="bad split"):
        SplitSpec.parse("train[a:b]")


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": CHATS[1]}) + "\n" + '{"messages": [oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        list(read_records(p))
    # A slice that stops before the bad line never reads it.
    assert len(list(read_records(p, limit=1))) == 1


def test_unknown_role_names_file_line_and_role(tmp_path):
    p = tmp_path / "roles.jsonl"
    p.write_text(json.dumps({"messages": CHATS[1]}) + "\n"
                 + json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"roles\.jsonl:2: unknown role 'wizard'"):
        list(read_records(p))
    q = tmp_path / "sg.json"
    q.write_text(json.dumps([{"conversations": [{"from": "narrator", "value": "x"}]}]))
    with pytest.raises(DataError, match=r"sg\.json:1: unknown role 'narrator'"):
        list(read_records(q))


# ------------------------------------------------------------------ tokenize_chat


def test_mask_is_exactly_assistant_tokens(chat_tokenizer):
    tok = chat_tokenizer
    ex = tokenize_chat(tok, CHATS[0], 512)
    assert ex.drop_reason is None and not ex.truncated
    assert [tok.decode(r) for r in _runs(ex.input_ids, ex.loss_mask)] == ["3 4 5 6 7 8 9<|end|>",
                                                                          "12 + 7 = 19<|end|>"]
    last = tokenize_chat(tok, CHATS[0], 512, last_turn_only=True)
    assert last.input_ids == ex.input_ids
    assert [tok.decode(r) for r in _runs(last.input_ids, last.loss_mask)] == ["12 + 7 = 19<|end|>"]


@pytest.mark.parametrize("last_turn_only", [False, True])
def test_prefix_rendering_fallback_matches_generation_mask(chat_tokenizer, last_turn_only):
    assert "{%- generation" not in PLAIN_TEMPLATE
    for chat in CHATS:
        a = tokenize_chat(chat_tokenizer, chat, 512, last_turn_only=last_turn_only)
        b = tokenize_chat(chat_tokenizer, chat, 512, last_turn_only=last_turn_only,
                          chat_template=PLAIN_TEMPLATE)
        assert b.drop_reason is None
        assert (a.input_ids, a.loss_mask) == (b.input_ids, b.loss_mask)


def test_template_not_prefix_consistent_is_dropped(chat_tokenizer):
    tpl = "{{ messages|length }}" + PLAIN_TEMPLATE
    ex = tokenize_chat(chat_tokenizer, CHATS[0], 512, chat_template=tpl)
    assert ex.drop_reason == TEMPLATE_NOT_INCREMENTAL


def test_truncation_drop_long_and_prompt_too_long(chat_tokenizer):
    tok = chat_tokenizer
    full = tokenize_chat(tok, CHATS[0], 512)
    n = len(full.input_ids)
    cut = tokenize_chat(tok, CHATS[0], n - 3)
    assert cut.truncated and cut.drop_reason is None
    assert cut.input_ids == full.input_ids[: n - 3] and cut.loss_mask == full.loss_mask[: n - 3]
    assert tokenize_chat(tok, CHATS[0], n - 3, truncate=False).drop_reason == TOO_LONG
    first_sup = full.loss_mask.index(1)
    assert tokenize_chat(tok, CHATS[0], first_sup).drop_reason == PROMPT_TOO_LONG
    assert tokenize_chat(tok, CHATS[0], first_sup + 1).drop_reason is None


def test_no_assistant_and_template_errors(chat_tokenizer):
    assert tokenize_chat(chat_tokenizer, [{"role": "user", "content": "hi"}], 64).drop_reason == NO_ASSISTANT
    tool_chat = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"},
                 {"role": "assistant", "content": "ok"}]
    ex = tokenize_chat(chat_tokenizer, tool_chat, 64)  # the toy template rejects tool turns
    assert ex.drop_reason == TEMPLATE_ERROR and "unsupported role" in ex.error


def test_tokenizer_without_chat_template(chat_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(DataError, match="--chat-template"):
        tokenize_chat(tok, CHATS[1], 64)
    tok.save_pretrained(tmp_path / "notpl")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CHATS[1]}) + "\n")
    notpl = tmp_path / "notpl"
    for f in notpl.glob("chat_template*"):
        f.unlink()
    with pytest.raises(DataError, match="--chat-template"):
        prepare(data, notpl, tmp_path / "out", progress=False)
    tpl = tmp_path / "tpl.jinja"
    tpl.write_text(CHAT_TEMPLATE)
    s = prepare(data, notpl, tmp_path / "out", chat_template=tpl, progress=False)
    assert s.kept == 1


# ------------------------------------------------------------------ prepare


def test_prepare_writes_dataset_manifest_counts(chat_tokenizer_dir, chat_tokenizer, tmp_path, monkeypatch):
    import peagle.data.preparation

    monkeypatch.setattr(peagle.data.preparation, "_ARROW_CHUNK", 2)  # exercise the chunked Arrow path
    src = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"messages": c}) for c in CHATS]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    sharegpt = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    lines.append(json.dumps({"conversations": sharegpt}))
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "prep"
    s = prepare(src, chat_tokenizer_dir, out, max_length=40, progress=False)
    assert (s.read, s.kept) == (6, 5) and s.dropped == {NO_ASSISTANT: 1}
    assert s.truncated == 2  # the first and third chats are longer than 40 tokens
    text = s.format_summary()
    for needle in ("records read: 6", "examples kept: 5 from 5 records", "no_assistant: 1", "supervised tokens",
                   "length histogram"):
        assert needle in text

    p = load_prepared(out)
    assert len(p) == 5
    expect = [tokenize_chat(chat_tokenizer, c, 40) for c in CHATS]
    for i, e in enumerate(expect):
        assert p[i]["input_ids"] == e.input_ids and p[i]["loss_mask"] == e.loss_mask
    assert p.lengths[:4] == [len(e.input_ids) for e in expect]
    m = p.manifest
    assert m["counts"]["kept"] == 5 and m["counts"]["dropped"] == {NO_ASSISTANT: 1}
    assert len(m["chat_template_sha256"]) == 64 and m["vocab_size"] == len(chat_tokenizer)
    assert sum(c for _, _, c in m["length_histogram"]) == 5
    all_ids = torch.tensor([t for i in range(5) for t in p[i]["input_ids"]])
    sup_ids = torch.tensor([t for i in range(5) for t, b in zip(p[i]["input_ids"], p[i]["loss_mask"],
                                                                   strict=True) if b])
    assert torch.equal(p.all_counts, torch.bincount(all_ids, minlength=len(chat_tokenizer)))
    assert torch.equal(p.supervised_counts, torch.bincount(sup_ids, minlength=len(chat_tokenizer)))
    assert int(p.supervised_counts.sum()) == s.supervised_tokens and int(p.all_counts.sum()) == s.tokens

    with pytest.raises(DataError, match="not empty"):
        prepare(src, chat_tokenizer_dir, out, progress=False)


def test_prepare_vocab_size_from_target_config(llama_dir, chat_jsonl, tmp_path):
    from transformers import AutoConfig

    rows = embedding_rows(llama_dir)  # what the CLI and the demo pass: the model's rows, not len(tokenizer)
    assert rows == AutoConfig.from_pretrained(llama_dir).vocab_size
    p = load_prepared(prepare(chat_jsonl, llama_dir, tmp_path / "o", vocab_size=rows, progress=False).output_dir)
    assert p.manifest["vocab_size"] == rows and p.all_counts.numel() == rows
    assert embedding_rows(tmp_path / "o") is None  # no model config.json: a tokenizer alone


def test_empty_dataset_after_filtering_lists_reasons(chat_tokenizer_dir, tmp_path):
    src = tmp_path / "noasst.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                           for i in range(3)))
    with pytest.raises(DataError, match=r"empty dataset after filtering.*no_assistant: 3"):
        prepare(src, chat_tokenizer_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_max_length_smaller_than_prompt(chat_tokenizer_dir, chat_jsonl, tmp_path):
    with pytest.raises(DataError, match=f"{PROMPT_TOO_LONG}: 4"):
        prepare(chat_jsonl, chat_tokenizer_dir, tmp_path / "out", max_length=4, progress=False)


# ------------------------------------------------------------------ bad records, encodings, splits


def _bad_file(tmp_path):
    """Good records on lines 1, 3, 6, 8; bad ones: malformed JSON (2), non-UTF-8 (4), an image part
    (5), unknown role (7)."""
    good = [json.dumps({"messages": c}).encode() for c in CHATS]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "a"}]}
    lines = [good[0], b'{"messages": [', good[1], b'{"messages": "caf\xe9"}', json.dumps(image).encode(),
             good[2], json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), good[3]]
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_strict_mode_names_file_line_and_how_to_skip(chat_tokenizer_dir, tmp_path):
    p = _bad_file(tmp_path)
    with pytest.raises(DataError) as e:
        prepare(p, chat_tokenizer_dir, tmp_path / "out", progress=False)
    assert str(e.value) == (f"{p}:2: malformed JSON (Expecting value at column 15); to skip bad records and "
                            "list them in the summary, pass --on-error skip")
    assert not (tmp_path / "out").exists() and [x.name for x in tmp_path.iterdir()] == ["mixed.jsonl"]


def test_skip_mode_counts_bad_records_by_reason(chat_tokenizer_dir, chat_tokenizer, tmp_path):
    p = _bad_file(tmp_path)
    s = prepare(p, chat_tokenizer_dir, tmp_path / "out", on_error="skip", progress=False)
    assert (s.read, s.records_kept, s.kept) == (8, 4, 4)
    assert s.bad_records == {"malformed_json": 1, "not_utf8": 1, "non_text_content": 1, "unknown_role": 1}
    assert s.bad_examples == [
        f"{p}:2: malformed JSON (Expecting value at column 15)",
        f"{p}:4: not valid UTF-8 (byte 0xe9 at column 18); re-encode the file as UTF-8",
        f"{p}:5: message 0 (user): content part 0 has type 'image_url'; peagle trains on text only (text parts: "
        "input_text, output_text, refusal, text)",
        f"{p}:7: unknown role 'wizard' (expected one of ['assistant', 'developer', 'system', 'tool', 'user'])",
    ]
    text = s.format_summary()
    assert "records read: 8 (4 bad, skipped)" in text and "bad records skipped: 4" in text
    assert "  not_utf8: 1" in text and f"  e.g. {p}:4: not valid UTF-8" in text
    data = load_prepared(tmp_path / "out")
    assert data.manifest["on_error"] == "skip"
    assert data.manifest["bad_records"] == {"counts": s.bad_records, "first": s.bad_examples}
    assert [data[i]["input_ids"] for i in range(4)] == [tokenize_chat(chat_tokenizer, c, 2048).input_ids
                                                        for c in CHATS]
    few = prepare(p, chat_tokenizer_dir, tmp_path / "few", on_error="skip", max_errors_shown=2, progress=False)
    assert len(few.bad_examples) == 2 and sum(few.bad_records.values()) == 4


def test_utf8_bom_is_a_normal_file_and_bad_bytes_name_the_line(chat_tokenizer_dir, tmp_path):
    body = "".join(json.dumps({"messages": c}) + "\n" for c in CHATS)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"messages": c} for c in CHATS]).encode())
    assert [r.messages for r in read_records(tmp_path / "bom.jsonl")] == CHATS
    assert [r.messages for r in read_records(tmp_path / "bom.json")] == CHATS
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[\n{"messages": []},\n{"messages": "\xff"}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: not valid UTF-8 \(byte 0xff\)"):
        list(read_records(bad))
    tpl = tmp_path / "tpl.jinja"
    tpl.write_bytes(b"\xef\xbb\xbf" + CHAT_TEMPLATE.encode())
    s = prepare(tmp_path / "bom.jsonl", chat_tokenizer_dir, tmp_path / "out", chat_template=tpl, progress=False)
    assert s.kept == 4 and load_prepared(tmp_path / "out").manifest["chat_template_sha256"] == \
        __import__("hashlib").sha256(CHAT_TEMPLATE.encode()).hexdigest()


def test_split_name_on_a_data_file(chat_jsonl, chat_tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match=r"split 'test': .*chats\.jsonl has no named splits .*use a slice"):
        list(read_records(chat_jsonl, split="test"))
    with pytest.raises(DataError, match="split 'validation'"):
        prepare(chat_jsonl, chat_tokenizer_dir, tmp_path / "o", split="validation[:2]", progress=False)
    assert [r.line for r in read_records(chat_jsonl, split="train[1:3]")] == [2, 3]
    s = prepare(chat_jsonl, chat_tokenizer_dir, tmp_path / "o", split="[1:3]", progress=False)
    assert s.read == 2 and load_prepared(tmp_path / "o").manifest["split"] == "[1:3]"


# ------------------------------------------------------------------ prepare is one atomic unit


def test_draft_vocab_and_mask_token_written_inside_the_dataset(llama_dir, chat_jsonl, chat_tokenizer, tmp_path):
    import os
    import stat

    out = tmp_path / "prep"
    s = prepare(chat_jsonl, llama_dir, out, draft_vocab_size=40,
                vocab_size=embedding_rows(llama_dir), progress=False)
    V = len(chat_tokenizer) + 8  # tiny_target's embedding rows
    choice = load_prepared(out).draft_choice
    assert not (out / "draft_vocab.json").exists()  # the choice is recorded once, in the manifest
    assert choice["draft_vocab_size"] == 40 and choice["vocab_size"] == V
    assert choice["mask_token_id"] == len(chat_tokenizer)  # the first row the tokenizer never produces
    assert load_prepared(out).manifest["draft_vocab"] == choice
    assert (s.draft_vocab_size, s.mask_token_id) == (40, len(chat_tokenizer))
    assert f"draft vocabulary: 40 of {V} tokens" in s.format_summary()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_failed_prepare_leaves_no_dataset_and_no_temp_dir(llama_dir, chat_jsonl, chat_tokenizer, tmp_path,
                                                          monkeypatch):
    bos = chat_tokenizer.bos_token_id  # occurs in every example
    with pytest.raises(DataError, match=f"mask_token_id {bos} occurs"):
        prepare(chat_jsonl, llama_dir, tmp_path / "out", draft_vocab_size=100, mask_token_id=bos,
                vocab_size=embedding_rows(llama_dir), progress=False)
    assert list(tmp_path.iterdir()) == []
    # A failure while writing (disk full, ...) leaves nothing either.
    import safetensors.torch

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        prepare(chat_jsonl, llama_dir, tmp_path / "out",
                vocab_size=embedding_rows(llama_dir), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_a_prepared_dataset(chat_tokenizer_dir, chat_jsonl, tmp_path):
    out = tmp_path / "prep"
    prepare(chat_jsonl, chat_tokenizer_dir, out, limit=1, progress=False)
    s = prepare(chat_jsonl, chat_tokenizer_dir, out, overwrite=True, progress=False)
    assert s.read == 4 and len(load_prepared(out)) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["prep"]
    foreign = tmp_path / "model"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("weights")
    with pytest.raises(DataError, match=r"model is not a prepared dataset \(it holds model\.safetensors\); "
                                        "--overwrite only replaces"):
        prepare(chat_jsonl, chat_tokenizer_dir, foreign, overwrite=True, progress=False)
    assert (foreign / "model.safetensors").read_text() == "weights"
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(DataError, match="is a file, not a directory"):
        prepare(chat_jsonl, chat_tokenizer_dir, afile, progress=False)
    with pytest.raises(DataError, match="which is a file, not a directory"):
        prepare(chat_jsonl, chat_tokenizer_dir, afile / "sub", progress=False)


# ------------------------------------------------------------------ dataset ↔ target


def swapped_vocab_tokenizer(src_dir, out_dir, a="3", b="4"):
    """A copy of the tokenizer in ``src_dir`` whose tokens ``a`` and ``b`` swap ids: same size, same
    class, another vocabulary."""
    import shutil

    shutil.copytree(src_dir, out_dir)
    spec = json.loads((out_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out_dir / "tokenizer.json").write_text(json.dumps(spec))
    return out_dir


def test_dataset_refuses_another_tokenizer_of_the_same_size(chat_tokenizer_dir, chat_jsonl, tmp_path):
    from transformers import AutoTokenizer

    from peagle.data import check_dataset_matches_target, tokenizer_fingerprint

    prepare(chat_jsonl, chat_tokenizer_dir, tmp_path / "prep", progress=False)
    manifest = load_prepared(tmp_path / "prep").manifest
    x = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    assert manifest["tokenizer"]["vocab_sha256"] == tokenizer_fingerprint(x)["vocab_sha256"]
    check_dataset_matches_target(manifest, x)  # its own tokenizer: fine
    check_dataset_matches_target(manifest, chat_tokenizer_dir)
    ydir = swapped_vocab_tokenizer(chat_tokenizer_dir, tmp_path / "y")
    y = AutoTokenizer.from_pretrained(ydir)
    assert len(y) == len(x) and type(y) is type(x)
    with pytest.raises(DataError) as e:
        check_dataset_matches_target(manifest, ydir, dataset="runs/prep")
    msg = str(e.value)
    assert msg.startswith(f"runs/prep was prepared for another tokenizer than {ydir}'s (vocabulary sha256 ")
    assert "length" not in msg and "class" not in msg and "\n" not in msg
    y.chat_template = PLAIN_TEMPLATE
    with pytest.raises(DataError, match=r"vocabulary sha256 .*; chat template sha256"):
        check_dataset_matches_target(manifest, y)
    x2 = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    x2.chat_template = PLAIN_TEMPLATE
    with pytest.raises(DataError, match=r"\(chat template sha256 [0-9a-f]{12}… vs [0-9a-f]{12}…\)"):
        check_dataset_matches_target(manifest, x2)
    # prepared with --chat-template: the target's own template is not compared
    prepare(chat_jsonl, chat_tokenizer_dir, tmp_path / "p2", chat_template=PLAIN_TEMPLATE, progress=False)
    check_dataset_matches_target(load_prepared(tmp_path / "p2").manifest, x)
