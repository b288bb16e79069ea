"""The demo corpus is deterministic, correct, and its held-out prompts are unseen; the target caches."""

from __future__ import annotations

import json
import re

import pytest

import peagle.demo.tiny_lm as tiny_lm
from peagle.demo.corpus import DEMO_TASKS, TASKS, generate_corpus, write_jsonl
from peagle.demo.tiny_lm import MARKER, TargetSettings, read_marker, train_demo_target


def _prompt(r: dict) -> str:
    return r["messages"][0]["content"]


def _answer(r: dict) -> str:
    return r["messages"][1]["content"]


def _nums(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _after_colon(text: str) -> str:
    return text.split(":", 1)[1].strip()


def _expected(task: str, prompt: str) -> str | None:
    """Recompute an answer from its prompt, independently of the generator's code."""
    if task == "count_up":
        a, b = _nums(prompt)
        return " ".join(str(i) for i in range(a, b + 1))
    if task == "count_down":
        b, a = _nums(prompt)
        return " ".join(str(i) for i in range(b, a - 1, -1))
    if task == "count_step":
        nums = _nums(prompt)
        k = nums[0] if prompt.startswith("count by") else nums[2]
        a, b = (nums[1], nums[2]) if prompt.startswith("count by") else (nums[0], nums[1])
        return " ".join(str(i) for i in range(a, b + 1, k))
    if task == "number_bullets":
        a, b = _nums(prompt)
        return "\n".join(f"- {i}" for i in range(a, b + 1))
    if task == "add":
        a, b = _nums(prompt)
        return f"{a} + {b} = {a + b}, so the answer is {a + b}."
    if task == "reverse":
        return " ".join(_after_colon(prompt).split()[::-1])
    if task == "bullets":
        return "\n".join("- " + w for w in _after_colon(prompt).split())
    if task == "commas":
        return ", ".join(_after_colon(prompt).split())
    if task == "repeat":
        m = re.search(r"(?:word|Say) (\w+) (\d+) times", prompt)
        assert m, prompt
        return " ".join([m.group(1)] * int(m.group(2)))
    if task == "spell":
        w = re.search(r"(?:word|spell) (\w+)[.?]", prompt).group(1)
        return f"The word {w} has {len(w)} letters: {'-'.join(w)}."
    if task == "times":
        a, n = _nums(prompt)[0], _nums(prompt)[-1]
        return ", ".join(f"{a} x {i} = {a * i}" for i in range(1, n + 1))
    return None


def test_deterministic_given_seed():
    a = generate_corpus(3, 300, 40)
    b = generate_corpus(3, 300, 40)
    c = generate_corpus(4, 300, 40)
    assert a == b
    assert a != c
    assert len(a[0]) == 300 and len(a[1]) == 40


def test_heldout_disjoint_from_train():
    train, heldout = generate_corpus(0, 3000, 200)
    train_prompts = {_prompt(r) for r in train}
    held_prompts = [_prompt(r) for r in heldout]
    assert not train_prompts & set(held_prompts)
    assert len(set(held_prompts)) == len(held_prompts)
    # Held-out is spread over tasks, not concentrated on the ones with the largest prompt space.
    assert len({r["task"] for r in heldout}) >= len(DEMO_TASKS) - 2


def test_records_are_chat_records_and_answers_correct():
    train, heldout = generate_corpus(1, 2000, 200)
    checked: set[str] = set()
    for r in train + heldout:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["task"] in TASKS
        want = _expected(r["task"], _prompt(r))
        if want is not None:
            assert _answer(r) == want, (r["task"], _prompt(r))
            checked.add(r["task"])
    assert len(checked) >= 8


def test_answer_lengths_reasonable():
    train, _ = generate_corpus(0, 500, 10)
    lengths = [len(_answer(r).split()) for r in train]
    assert min(lengths) >= 3 and max(lengths) <= 60


def test_task_subset():
    train, heldout = generate_corpus(0, 400, 40, tasks=["bullets", "commas"])
    assert {r["task"] for r in train + heldout} == {"bullets", "commas"}
    for r in train + heldout:
        assert _answer(r) == _expected(r["task"], _prompt(r))


def test_write_jsonl(tmp_path):
    train, _ = generate_corpus(0, 5, 1)
    path = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == train


def test_train_demo_target_smoke_and_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = TargetSettings(
        num_train=200, num_heldout=8, vocab_size=320, hidden_size=32, num_layers=2,
        num_heads=2, num_kv_heads=1, intermediate_size=64, steps=6, batch_size=8,
        warmup_steps=2, max_new_tokens=8,
    )  # fmt: skip
    logs: list[str] = []
    path = train_demo_target(tmp_path, settings=settings, progress=False, log=logs.append)  # ~5 s idle
    assert path == tmp_path / "target"
    marker = read_marker(path)
    assert marker["digest"] == settings.digest()
    assert 0.0 <= marker["heldout_accuracy"] <= 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["target"]  # no temp dir left behind
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size > len(tok)  # spare ids for a mask token

    logs.clear()
    weights = sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir())
    with monkeypatch.context() as m:  # the cached target is used as is: training would fail here
        m.setattr(tiny_lm, "_train", lambda *a, **k: pytest.fail("a cached target was trained again"))
        assert train_demo_target(tmp_path, settings=settings, progress=False, log=logs.append) == path
    assert sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir()) == weights  # nothing rewritten
    assert any("cached" in line for line in logs)

    # A different setting invalidates the cache; a corrupt marker too.
    (path / MARKER).write_text("{not json")
    assert read_marker(path) is None


@pytest.mark.parametrize("env", [True, False])
def test_default_cache_dir(monkeypatch, tmp_path, env):
    from peagle.demo.tiny_lm import default_cache_dir

    if env:
        monkeypatch.setenv("PEAGLE_CACHE", str(tmp_path))
        assert default_cache_dir() == tmp_path
    else:
        monkeypatch.delenv("PEAGLE_CACHE", raising=False)
        assert default_cache_dir().parts[-3:] == (".cache", "peagle", "demo")
