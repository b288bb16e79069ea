"""`peagle demo --quick`: the embedded demo end to end (tiny target, a few steps), its report and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peagle.cli import main

PLOTS = ("loss.png", "depth_accuracy.png", "al_during_training.png", "acceptance_per_position.png",
         "al_vs_k.png", "al_histogram.png")


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo-output"
    cache = tmp_path / "cache"
    rc = main(["demo", "--out", str(out), "--cache-dir", str(cache), "--quick", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and "mean AL" in printed

    # eval.json: the `peagle eval --json` schema of issue 4, AL for every K' = 1..K
    ev = json.loads((out / "eval.json").read_text())
    k = ev["num_speculative_tokens"]
    assert k == 4 and sorted(ev["acceptance_length"]) == [str(i) for i in range(1, k + 1)]
    assert all(1.0 <= v <= i + 1 for i, v in ((int(i), v) for i, v in ev["acceptance_length"].items()))
    assert len(ev["per_position"]) == k and ev["num_drafts"] > 0
    rates = ev["per_position"]
    assert all(0.0 <= r <= 1.0 for r in rates) and rates == sorted(rates, reverse=True)
    assert ev["acceptance_length"][str(k)] == pytest.approx(1 + sum(rates))
    assert len(ev["prompts"]) == 12 and {"completion", "accepted_per_round"} <= set(ev["prompts"][0])

    # report, plots, config, summary
    report = (out / "report.md").read_text()
    for needle in ("mean AL", "Per-position", "held-out exact match", "tokens/s", "peagle train", "--engine vllm",
                   "vllm.entrypoints.openai.api_server"):
        assert needle in report, needle
    for png in PLOTS:
        assert (out / "plots" / png).stat().st_size > 1000, png
        assert f"plots/{png}" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["acceptance_length"] == ev["acceptance_length"]
    assert 0.0 <= summary["target_accuracy"] <= 1.0 and summary["train_steps"] == 6
    from peagle.config.training import load_config

    cfg = load_config(out / "train.yaml")
    assert cfg.model.num_depths == 4 and cfg.train.eval_every > 0

    # the exported draft is a speculators-format checkpoint that loads back
    from peagle.model.draft import PEagleDraft

    draft = PEagleDraft.from_pretrained(out / "draft")
    config = json.loads((out / "draft" / "config.json").read_text())
    assert config["speculators_model_type"] == "peagle" and draft.config.num_speculative_tokens == 4
    assert draft.config.draft_vocab_size == 256
    # served as is: the verifier is the (linked) cached target, the aux layers distinct and increasing
    verifier = Path(config["speculators_config"]["verifier"]["name_or_path"])
    assert verifier.is_absolute() and (verifier / "config.json").is_file()
    assert (out / "target").resolve() == verifier.resolve()
    ids = config["eagle_aux_hidden_state_layer_ids"]
    assert ids == sorted(set(ids)) and len(ids) == 3
    assert (out / "data" / "train_chats.jsonl").is_file()  # written by `peagle regenerate`'s HF engine
    rows = [json.loads(line) for line in (out / "data" / "train_chats.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in rows)

    # a second run reuses the cached target and replaces the previous output
    (out / "stale.txt").write_text("kept: the demo only replaces what it wrote")
    summary2 = __import__("peagle.demo.run", fromlist=["run_demo"]).run_demo(
        out, cache, quick=True, progress=False, log=lambda _: None)
    assert summary2["target_cached"] and not summary["target_cached"]
    assert (out / "stale.txt").exists() and (out / "report.md").exists()


def test_demo_refuses_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    rc = main(["demo", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--quick"])
    assert rc == 1
    assert "did not create" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").exists()
