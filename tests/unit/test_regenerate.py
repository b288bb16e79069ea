"""peagle regenerate: every assistant turn rewritten by the target from the regenerated history, resumable,
clear errors. (Against a real `vllm serve`: tests_vllm/test_regenerate.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peagle.regenerate import HFEngine, RegenError, Sampling, ServerEngine, regenerate

CHATS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "count from 3 to 9"},
     {"role": "assistant", "content": "old 1"}, {"role": "user", "content": "what is 12 + 7?"},
     {"role": "assistant", "content": "old 2"}],
    [{"role": "user", "content": "sort these words: pear, apple, fig"}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "how many letters has apple?"}, {"role": "assistant", "content": "y"}],
    [{"role": "user", "content": "what is the capital of France?"}, {"role": "assistant", "content": "z"}],
    [{"role": "user", "content": "count from 1 to 4"}, {"role": "assistant", "content": "w"}],
]
NEW = 12


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    p = tmp_path_factory.mktemp("regen") / "chats.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return p


def _greedy_reply(model, tok, messages):
    """Independent reference: HF generate on the chat template, decoded without the stop token."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    stops = set(model.generation_config.eos_token_id)
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    return tok.decode(new if cut is None else new[:cut], skip_special_tokens=True)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_turn_from_the_regenerated_history(llama_dir, chats, tmp_path):
    out = tmp_path / "regen.jsonl"
    summary = regenerate(chats, out, HFEngine(llama_dir, batch_size=2), sampling=Sampling(max_tokens=NEW),
                         progress=False, log=lambda _: None)
    rows = _rows(out)
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert summary["records"] == len(CHATS) and summary["turns"] == 6
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    dropped = summary["dropped"].get("empty response", 0)
    assert len(rows) == len(CHATS) - dropped
    for r in rows:
        chat = CHATS[r["index"]]
        history = []
        for old, new in zip(chat, r["messages"], strict=True):
            if old["role"] == "assistant":
                assert new["content"] == _greedy_reply(model, tok, history)  # from the regenerated history
                assert new["content"] != old["content"]
            else:
                assert new == old
            history.append(new)
        assert len(r["finish_reasons"]) == sum(m["role"] == "assistant" for m in chat)
        assert set(r["finish_reasons"]) <= {"stop", "length"}
        assert r["truncated"] == ("length" in r["finish_reasons"])
        assert r["source"].endswith(f"chats.jsonl:{r['index'] + 1}")


class _Dies(HFEngine):
    """Killed after the first chunk of records (two waves of requests: record 0 has two turns)."""

    calls = 0

    def complete(self, requests, sampling, length_hints=None):
        _Dies.calls += 1
        if _Dies.calls > 2:
            raise KeyboardInterrupt
        return super().complete(requests, sampling, length_hints)


def test_resume_after_kill_no_duplicates_no_gaps(llama_dir, chats, tmp_path):
    whole = tmp_path / "whole.jsonl"
    regenerate(chats, whole, HFEngine(llama_dir, batch_size=1), sampling=Sampling(max_tokens=NEW),
               progress=False, log=lambda _: None)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        regenerate(chats, out, _Dies(llama_dir, batch_size=1), sampling=Sampling(max_tokens=NEW), progress=False,
                   log=lambda _: None)
    partial = out.with_name(out.name + ".partial")
    first = _rows(partial)
    assert 0 < len(first) < len(CHATS) and not out.exists()
    with open(partial, "a") as f:
        f.write('{"index": 99, "messa')  # a torn last line, as a kill during the write leaves
    logs = []
    regenerate(chats, out, HFEngine(llama_dir, batch_size=1), sampling=Sampling(max_tokens=NEW), progress=False,
               log=logs.append)
    assert any("resuming" in line for line in logs)
    assert out.read_text() == whole.read_text() and not partial.exists()
    with pytest.raises(RegenError, match="already exists"):
        regenerate(chats, out, HFEngine(llama_dir, batch_size=1), progress=False, log=lambda _: None)


def test_dead_server_is_one_clear_error(chats, tmp_path):
    engine = ServerEngine(["http://127.0.0.1:9"], model="m", retries=1, timeout=5)
    with pytest.raises(RegenError, match=r"no server answered \(http://127.0.0.1:9\) after 2 tries"):
        engine.complete([([{"role": "user", "content": "hi"}], None)], Sampling())
    out = subprocess.run([sys.executable, "-m", "peagle.cli", "regenerate", str(chats), "--out",
                          str(tmp_path / "o.jsonl"), "--server", "http://127.0.0.1:9", "--retries", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "no server answered" in out.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_hf_batches_group_turns_of_like_original_length(llama_dir, tmp_path):
    """A static batch decodes until its longest row ends: the HF engine batches turns by the length of the
    turn they replace (the likely length of the new one), not by prompt length."""
    from peagle.eval import tokenize_prompts

    old_lengths = [50, 1, 40, 2, 30, 3]
    chats = [[{"role": "user", "content": f"count from {i} to {i + 5}"}, {"role": "assistant", "content": "x" * n}]
             for i, n in enumerate(old_lengths)]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    engine = HFEngine(llama_dir, batch_size=2)
    prompts = [tuple(p) for p in tokenize_prompts(engine.tokenizer, [{"messages": m[:1]} for m in chats])]
    seen, generate = [], engine.target.model.generate

    def recording(input_ids, attention_mask, **kw):
        seen.append({tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask, strict=True)})
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    engine.target.model.generate = recording
    regenerate(src, tmp_path / "out.jsonl", engine, sampling=Sampling(max_tokens=4), progress=False,
               log=lambda _: None)
    by_hint = sorted(range(len(chats)), key=lambda i: old_lengths[i])  # 1, 3, 5, 4, 2, 0
    assert seen == [{prompts[i] for i in by_hint[k:k + 2]} for k in range(0, len(chats), 2)]
