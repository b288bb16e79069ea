"""The real-model demo's prompts: deterministic, every kind, held-out ones never among the training ones,
math answers right; AL per kind and the AL-vs-steps fit of its report."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest

from peagle.demo.real import _interleave
from peagle.demo.real_corpus import KINDS, generate_real_corpus, write_heldout
from peagle.demo.real_report import al_by_kind, al_growth


def _key(rec: dict) -> tuple[str, ...]:
    return tuple(m["content"] for m in rec["messages"] if m["role"] != "assistant")


def test_deterministic_distinct_and_held_out() -> None:
    a, b = generate_real_corpus(0, 600, 8), generate_real_corpus(0, 600, 8)
    assert a == b and generate_real_corpus(1, 600, 8).train != a.train
    kinds = Counter(r["kind"] for r in a.train)
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 50
    train = {_key(r) for r in a.train}
    assert len(train) == 600  # distinct training prompts
    held = [r for kind in KINDS for r in a.heldout[kind]]
    assert len(held) == 8 * len(KINDS) and not train & {_key(r) for r in held}
    # held-out prompts do not depend on how many training prompts are drawn
    assert generate_real_corpus(0, 50, 8).heldout == a.heldout
    assert 0.45 < sum(r["messages"][0]["role"] == "system" for r in a.train) / 600 < 0.75


def test_shapes_of_the_records() -> None:
    c = generate_real_corpus(3, 300, 6)
    for r in c.train:  # assistant turns to be written, after every user turn
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles[::2] == ["user"] * (len(roles) // 2) and roles[1::2] == ["assistant"] * (len(roles) // 2)
        assert all(m["content"] == "" for m in r["messages"] if m["role"] == "assistant")
    for kind in KINDS:
        for r in c.heldout[kind]:
            assert r["id"].startswith(kind) and r["kind"] == kind
            # single-turn held-out prompts end with the user turn; multi-turn ones with an answer to write
            assert r["messages"][-1]["role"] == ("assistant" if kind == "multi_turn" else "user")
    assert any(len(r["messages"]) >= 5 for r in c.train if r["kind"] == "multi_turn")


def _nums(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def test_math_answers() -> None:
    c = generate_real_corpus(0, 2000, 30)
    problems = [r for r in c.train if r["kind"] == "math"] + c.heldout["math"]
    assert len(problems) > 300
    for r in problems:
        text, answer = r["messages"][-2 if r["messages"][-1]["role"] == "assistant" else -1]["content"], r["answer"]
        n = _nums(text)
        if " and buys " in text:
            assert answer == n[0] + n[1]
        elif " gave " in text:
            assert answer == n[0] - n[1]
        elif text.startswith("A box holds"):
            assert answer == n[0] * n[1]
        elif " shares " in text:
            assert answer * n[1] == n[0]
        elif "km per hour" in text:
            assert answer == n[0] * n[1]
        elif "rectangle" in text:
            assert answer == n[0] * n[1]
        elif "% off" in text:
            assert answer == pytest.approx(n[0] * (100 - n[1]) / 100)
        else:
            assert answer == n[0] * n[1] + n[2], text


def test_heldout_files_and_interleaving(tmp_path) -> None:
    c = generate_real_corpus(0, 10, 3)
    files = write_heldout(c.heldout, tmp_path)
    assert sorted(files) == sorted(KINDS)
    assert [json.loads(x)["id"] for x in files["code"].read_text().splitlines()] == ["code-000", "code-001",
                                                                                      "code-002"]
    mixed = _interleave(c.heldout)
    assert [r["kind"] for r in mixed[: len(KINDS)]] == list(KINDS) and len(mixed) == 3 * len(KINDS)


def test_al_by_kind_pools_drafts() -> None:
    prompts = [{"index": 0, "num_drafts": 10, "num_accepted_tokens": 5, "acceptance_length": 1.5,
                "useful_acceptance_length": 1.4},
               {"index": 1, "num_drafts": 30, "num_accepted_tokens": 3, "acceptance_length": 1.1,
                "useful_acceptance_length": 1.1},
               {"index": 2, "num_drafts": 0, "num_accepted_tokens": 0, "acceptance_length": float("nan"),
                "useful_acceptance_length": None}]
    out = al_by_kind(prompts, ["code", "code", "math"])
    assert out["code"]["al"] == pytest.approx(1 + 8 / 40) and out["code"]["mean_prompt_al"] == pytest.approx(1.3)
    assert out["code"]["useful_al"] == pytest.approx(1 + (4 + 3) / 40)
    assert out["math"]["prompts"] == 1 and math.isnan(out["math"]["al"])


def test_al_growth_fit() -> None:
    log = [{"step": s, "al_k4": 1.0 + 0.1 * math.log2(s)} for s in (100, 200, 400, 800)]
    g = al_growth(log, 4)
    assert g["per_doubling"] == pytest.approx(0.1) and g["at_2x"] == pytest.approx(1.0 + 0.1 * math.log2(1600))
    assert al_growth(log[:1], 4) is None
