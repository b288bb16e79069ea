"""Base models and data that is not chat: ``{"text": ...}`` and ``{"input_ids", "loss_mask"}`` records.

On a BASE tokenizer (no chat template; it adds its bos like Llama's): text is every token supervised and
split at max_length on token boundaries, token ids keep their own mask and are checked against the
vocabulary (one error naming file:line, or counted with --on-error skip), files mix all kinds, and the
draft trains from a text-only dataset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import CHATS, build_chat_tokenizer

from peagle.data import (
    BAD_TOKENS,
    CHAT,
    NO_SUPERVISED,
    TEXT,
    TOKENS,
    UNWANTED_KIND,
    DataError,
    RecordError,
    eagle_shift,
    encode_text,
    load_prepared,
    prepare,
    read_records,
    tokenize_chat,
)

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
TEXTS = ["count from 3 to 9", "sort these words: pear, apple, fig", "12 + 7 = 19"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base-model tokenizer: no chat template; ``add_special_tokens=True`` prepends its bos."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    d = build_chat_tokenizer(tmp_path_factory.mktemp("base_tokenizer"), None, [BOS, EOS, PAD, END], bos=BOS,
                             eos=EOS, pad=PAD)
    tok = AutoTokenizer.from_pretrained(d)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.bos_token_id)])
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def base_tok(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    assert not tok.chat_template
    return tok


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _rows(out: Path) -> list[tuple[list[int], list[int]]]:
    p = load_prepared(out)
    return [(p[i]["input_ids"], p[i]["loss_mask"]) for i in range(len(p))]


def test_text_is_bos_plus_its_tokens_every_one_supervised(base_dir: Path, base_tok: Any, tmp_path: Path) -> None:
    from peagle.eval.prompts import tokenize_prompts

    src = _jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    s = prepare(src, base_dir, tmp_path / "out", max_length=64, progress=False)
    want = [[base_tok.bos_token_id] + base_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert _rows(tmp_path / "out") == [(ids, [1] * len(ids)) for ids in want]
    assert (s.read, s.kept, s.records_kept, s.truncated, s.dropped) == (3, 3, 3, 0, {})
    assert s.kinds == {TEXT: 3} and s.kept_by_kind == {TEXT: 3} and s.split_records == 0
    assert s.tokens == s.supervised_tokens == sum(map(len, want))
    m = load_prepared(tmp_path / "out").manifest
    assert m["chat_template_sha256"] is None and m["chat_template_source"] is None  # no template was used
    assert m["counts"]["records_by_kind"] == {TEXT: 3} and m["tokenization"]["spans"] is None
    assert set(m["tokenization"]["supervision"]) == {TEXT}
    assert "assistant spans" not in s.format_summary()
    assert "records by kind: text 3 (3 examples)" in s.format_summary()
    # peagle eval tokenizes a {"text": ...} prompt the same way (one shared function)
    assert tokenize_prompts(base_tok, [{"text": t} for t in TEXTS]) == want == [encode_text(base_tok, t) for t in TEXTS]


def test_long_text_is_split_on_token_boundaries(base_dir: Path, base_tok: Any, tmp_path: Path) -> None:
    long = " ".join(TEXTS) * 6
    full = [base_tok.bos_token_id] + base_tok(long, add_special_tokens=False)["input_ids"]
    L = 16
    assert len(full) > 3 * L and len(full) % L != 1  # several pieces, none a lone token
    src = _jsonl(tmp_path / "long.jsonl", [{"text": long}, {"text": TEXTS[0]}])
    s = prepare(src, base_dir, tmp_path / "out", max_length=L, progress=False)
    rows = _rows(tmp_path / "out")
    pieces = math.ceil(len(full) / L)
    assert [len(ids) for ids, _ in rows[:pieces]] == [L] * (len(full) // L) + [len(full) % L]
    assert [t for ids, _ in rows[:pieces] for t in ids] == full  # nothing lost, nothing repeated, in order
    assert all(mask == [1] * len(ids) for ids, mask in rows)
    assert rows[pieces][0] == [base_tok.bos_token_id] + base_tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert (s.read, s.kept, s.records_kept, s.truncated) == (2, pieces + 1, 2, 0)
    assert (s.split_records, s.split_examples, s.dropped) == (1, pieces, {})
    assert f"split at max_length: 1 records into {pieces} examples" in s.format_summary()
    m = load_prepared(tmp_path / "out").manifest["counts"]
    assert (m["split_records"], m["split_examples"], m["examples_by_kind"]) == (1, pieces, {TEXT: pieces + 1})


def test_token_records_keep_their_mask_and_split(base_dir: Path, tmp_path: Path) -> None:
    records = [
        {"input_ids": [10, 11, 12, 13], "loss_mask": [0, 0, 1, 1]},  # kept as given
        {"input_ids": [20, 21, 22]},  # no mask: every token
        {"input_ids": list(range(30, 40)), "loss_mask": [0, 1] * 5},  # 10 tokens at L = 4: 4 + 4 + 2
        {"input_ids": list(range(50, 59))},  # 9 tokens: 4 + 4 + a lone token, which supervises nothing
        {"input_ids": [60, 61, 62], "loss_mask": [1, 0, 0]},  # only position 0: nothing after the shift
        {"input_ids": [70, 71], "loss_mask": [False, True]},  # JSON booleans are 0/1
    ]
    s = prepare(_jsonl(tmp_path / "ids.jsonl", records), base_dir, tmp_path / "out", max_length=4, progress=False)
    assert _rows(tmp_path / "out") == [
        ([10, 11, 12, 13], [0, 0, 1, 1]),
        ([20, 21, 22], [1, 1, 1]),
        ([30, 31, 32, 33], [0, 1, 0, 1]), ([34, 35, 36, 37], [0, 1, 0, 1]), ([38, 39], [0, 1]),
        ([50, 51, 52, 53], [1, 1, 1, 1]), ([54, 55, 56, 57], [1, 1, 1, 1]),
        ([70, 71], [0, 1]),
    ]
    assert (s.read, s.kept, s.records_kept) == (6, 8, 5)
    assert s.dropped == {NO_SUPERVISED: 2} and (s.split_records, s.split_examples) == (2, 6)
    assert s.kinds == {TOKENS: 6} and s.tokens == 4 + 3 + 10 + 8 + 2 and s.supervised_tokens == 2 + 3 + 5 + 8 + 1
    p = load_prepared(tmp_path / "out")
    want_sup = [12, 13, 20, 21, 22, 31, 33, 35, 37, 39, *range(50, 58), 71]
    V = p.supervised_counts.numel()
    assert torch.equal(p.supervised_counts, torch.bincount(torch.tensor(want_sup), minlength=V))
    # the EAGLE shift reads these masks as it reads a chat's: element j is supervised by loss bit l[j+1]
    b = eagle_shift(torch.tensor([10, 11, 12, 13]), torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long))
    assert b.input_ids.reshape(-1)[:3].tolist() == [11, 12, 13]
    assert [bool(x) for x in b.loss_mask.reshape(-1)] == [False, True, True, False]


@pytest.mark.parametrize(("record", "message"), [  # N: the tokenizer's length
    ({"input_ids": [5, "N"]}, r"'input_ids'\[1\] = {n} is not a token id of this tokenizer \(0\.\.{last}\)"),
    ({"input_ids": [5, -1]}, r"'input_ids'\[1\] = -1 is not a token id"),
    ({"input_ids": [5, "6"]}, r"'input_ids'\[1\] is '6', not an integer"),
    ({"input_ids": [5, 6.0]}, r"'input_ids'\[1\] is 6\.0, not an integer"),
    ({"input_ids": [5, True]}, r"'input_ids'\[1\] is True, not an integer"),
    ({"input_ids": "5 6"}, r"'input_ids' must be a list of integers, got str"),
    ({"input_ids": [5, 6, 7], "loss_mask": [1, 1]}, r"'loss_mask' has 2 entries but 'input_ids' has 3"),
    ({"input_ids": [5, 6], "loss_mask": [1, 2]}, r"'loss_mask'\[1\] is 2; a loss mask holds 0 or 1"),
    ({"input_ids": [5, 6], "loss_mask": [1, 0.5]}, r"'loss_mask'\[1\] is 0\.5, not an integer"),
])
def test_a_bad_token_record_is_one_error_naming_file_and_line(base_dir: Path, base_tok: Any, tmp_path: Path,
                                                              record: dict[str, Any], message: str) -> None:
    n = len(base_tok)
    record = {k: [n if v == "N" else v for v in vs] if isinstance(vs, list) else vs for k, vs in record.items()}
    message = message.format(n=n, last=n - 1)
    good = {"input_ids": [5, 6, 7]}
    src = _jsonl(tmp_path / "ids.jsonl", [good, {"text": TEXTS[0]}, record, good])
    vocab = n + 8  # the target's embedding has rows past the tokenizer (extra_vocab): still not token ids
    with pytest.raises(DataError, match=rf"^{src}:3: {message}") as e:
        prepare(src, base_dir, tmp_path / "strict", max_length=16, vocab_size=vocab, progress=False)
    assert "\n" not in str(e.value) and "--on-error skip" in str(e.value)
    assert not (tmp_path / "strict").exists()
    s = prepare(src, base_dir, tmp_path / "skip", max_length=16, vocab_size=vocab, on_error="skip", progress=False)
    assert (s.read, s.kept, s.bad_records) == (4, 3, {BAD_TOKENS: 1})
    assert s.kinds == {TOKENS: 2, TEXT: 1} and len(s.bad_examples) == 1 and s.bad_examples[0].startswith(f"{src}:3: ")
    m = load_prepared(tmp_path / "skip").manifest
    assert m["bad_records"]["counts"] == {BAD_TOKENS: 1} and m["counts"]["read"] == 4


def test_mixed_files_are_counted_by_kind(chat_tokenizer_dir: Path, chat_tokenizer: Any, tmp_path: Path) -> None:
    """Chats go through the template, text and token ids never do (the template's tokens are not in them)."""
    a = _jsonl(tmp_path / "a.jsonl", [{"messages": CHATS[1]}, {"text": TEXTS[0]}, {"input_ids": [7, 8, 9]}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": TEXTS[1]}, {"messages": CHATS[3]},
                                      {"input_ids": [7, 8], "loss_mask": [0, 1]}])
    s = prepare([a, b], chat_tokenizer_dir, tmp_path / "out", max_length=64, progress=False)
    text = [encode_text(chat_tokenizer, t) for t in TEXTS[:2]]
    chats = [tokenize_chat(chat_tokenizer, c, 64) for c in (CHATS[1], CHATS[3])]
    assert _rows(tmp_path / "out") == [
        (chats[0].input_ids, chats[0].loss_mask), (text[0], [1] * len(text[0])), ([7, 8, 9], [1, 1, 1]),
        (text[1], [1] * len(text[1])), (chats[1].input_ids, chats[1].loss_mask), ([7, 8], [0, 1]),
    ]
    template_ids = {chat_tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>")}
    assert not template_ids & {t for ids in text for t in ids}
    assert s.kinds == s.kept_by_kind == {CHAT: 2, TEXT: 2, TOKENS: 2} and s.read == s.kept == 6
    assert "records by kind: chat 2 (2 examples), text 2 (2 examples), tokens 2 (2 examples)" in s.format_summary()
    assert "assistant spans" in s.format_summary()
    m = load_prepared(tmp_path / "out").manifest
    assert m["counts"]["records_by_kind"] == m["counts"]["examples_by_kind"] == {CHAT: 2, TEXT: 2, TOKENS: 2}
    assert m["tokenization"]["records_by_kind"] == {CHAT: 2, TEXT: 2, TOKENS: 2}
    assert len(m["chat_template_sha256"]) == 64 and m["chat_template_source"] == "tokenizer"
    assert set(m["tokenization"]["supervision"]) == {CHAT, TEXT, TOKENS}


def test_a_chat_without_a_template_names_its_line(base_dir: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "mixed.jsonl", [{"text": TEXTS[0]}, {"messages": CHATS[1]}])
    with pytest.raises(DataError, match=rf"^{src}:2: a chat record, but tokenizer .* has no chat template; pass one "
                                        "with --chat-template"):
        prepare(src, base_dir, tmp_path / "out", progress=False)
    # a template given explicitly is used for chats only
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")
    s = prepare(src, base_dir, tmp_path / "out", chat_template=tpl, progress=False)
    assert s.kinds == {TEXT: 1, CHAT: 1} and s.kept == 2
    assert load_prepared(tmp_path / "out").manifest["chat_template_source"] == str(tpl)


def test_chat_readers_refuse_other_kinds(tmp_path: Path) -> None:
    """``read_records`` reads chats unless asked for more (``peagle regenerate`` rewrites chats only)."""
    src = _jsonl(tmp_path / "d.jsonl", [{"messages": CHATS[1]}, {"text": "plain"}])
    with pytest.raises(RecordError, match=rf"^{src}:2: a text record \('text'\); only chat records") as e:
        list(read_records(src))
    assert e.value.reason == UNWANTED_KIND
    assert [r.kind for r in read_records(src, kinds=(CHAT, TEXT))] == [CHAT, TEXT]
    with pytest.raises(RecordError, match="both 'text' and 'input_ids'"):
        list(read_records(_jsonl(tmp_path / "e.jsonl", [{"text": "x", "input_ids": [1]}]), kinds=(TEXT, TOKENS)))


def test_the_draft_trains_from_plain_text(base_dir: Path, base_tok: Any, tmp_path: Path) -> None:
    """A base target, text-only data: prepare, build the run, and train a few steps; the loss goes down."""
    from peagle.config.training import load_config
    from peagle.demo.offline_models import tiny_target
    from peagle.run.build import build
    from peagle.run.train import train_step
    from peagle.target.hf import embedding_rows

    target = tiny_target("llama", base_tok, tmp_path / "target", num_layers=4)
    src = _jsonl(tmp_path / "text.jsonl", [{"text": " ".join(TEXTS)}] * 4)
    s = prepare(src, target, tmp_path / "data", max_length=32, draft_vocab_size=64,
                vocab_size=embedding_rows(target), progress=False)
    assert s.kinds == {TEXT: 4} and s.mask_token_id is not None and s.mask_token_id >= len(base_tok)
    cfg = {
        "data": {"dataset": str(tmp_path / "data"), "max_length": 32},
        "model": {"target": str(target), "num_layers": 1, "num_depths": 3},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 1, "grad_accum": 1, "max_steps": 8,
                  "save_every": 0, "progress": False, "tensorboard": False},
        "eval": {"enabled": False},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    run = build(load_config(tmp_path / "train.yaml"))
    losses = []
    for epoch, row in run.data.positions(run.state, run.total):
        record = train_step(run, epoch, row)
        assert record["supervised"] > 0 and math.isfinite(record["loss"])
        losses.append(record["loss"])
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
