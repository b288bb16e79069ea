"""benchmarks/quality.py's own arithmetic: per-file AL from vLLM's per-request rounds, the token budget's steps,
the ablation syntax (hand-computed cases; the benchmark itself runs against the real vLLM and speculators)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "quality.py"
spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def test_per_file_splits_vllm_rounds_by_held_out_file() -> None:
    # prompt 0 and 2 are "code", prompt 1 "math"; rounds = accepted draft tokens per round (K = 3)
    res = {"rounds": [[3, 0], [1, 1, 2], [2]], "num_drafts": 6, "num_accepted_tokens": 9}
    out = quality.per_file(res, ["code", "math", "code"], 3)
    assert out["code"]["num_drafts"] == 3 and out["code"]["num_accepted_tokens"] == 5
    assert out["code"]["acceptance_length"] == pytest.approx(1 + 5 / 3)
    assert out["code"]["per_position"] == pytest.approx([2 / 3, 2 / 3, 1 / 3])  # >=1: 3,2 ; >=2: 3,2 ; >=3: 3
    assert out["math"]["acceptance_length"] == pytest.approx(1 + 4 / 3)
    assert out["math"]["per_position"] == pytest.approx([1.0, 1 / 3, 0.0])


def test_per_file_refuses_rounds_that_do_not_sum_to_the_counters() -> None:
    with pytest.raises(SystemExit, match="do not sum"):
        quality.per_file({"rounds": [[1]], "num_drafts": 2, "num_accepted_tokens": 1}, ["a"], 2)


def test_steps_for_takes_the_fewest_steps_that_hold_the_budget() -> None:
    assert quality.steps_for([100, 200, 300], 100) == 1
    assert quality.steps_for([100, 200, 300], 101) == 2
    assert quality.steps_for([100, 200, 300], 600) == 3
    assert quality.steps_for([100, 200, 300], 450, within=True) == 2
    assert quality.steps_for([100, 200, 300], 300, within=True) == 2
    with pytest.raises(SystemExit, match="fewer than the budget"):
        quality.steps_for([100], 101)


def test_parse_ablation() -> None:
    assert quality.parse_ablation("lr3e-3=optim.lr=3e-3,model.freeze_lm_head=true") == (
        "lr3e-3", {"optim.lr": 3e-3, "model.freeze_lm_head": True})
    with pytest.raises(SystemExit, match="expected NAME"):
        quality.parse_ablation("bad=lr")
