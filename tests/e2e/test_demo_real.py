"""`peagle demo --real --quick`: the real-model demo end to end on SmolLM2-135M-Instruct (a few steps), its
report's AL table and files. Needs the `real` extra (skipped with the install command otherwise); the second
test also needs the vLLM venv (`make test-vllm` builds .venv-vllm) and checks vLLM's counters in the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peagle.cli import main
from peagle.demo.real import VLLM_VENV_ENV, find_vllm_peagle
from peagle.demo.real_corpus import KINDS

PLOTS = ("loss.png", "depth_accuracy.png", "al_during_training.png", "acceptance_per_position.png",
         "al_vs_k.png", "al_histogram.png")


def _need_real_extra() -> None:
    from peagle.target.real_model import RealModelUnavailable, check_real_extra

    try:
        check_real_extra()
    except RealModelUnavailable as e:
        pytest.skip(str(e))


def _al_rows(report: str) -> dict[int, list[str]]:
    """The acceptance table's rows: K' -> cells."""
    rows = {}
    section = report.split("## Acceptance", 1)[1].split("\n\n", 2)[1]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def _run_quick(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, dict, str]:
    rc = main(["demo", "--real", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and "mean AL at K=4" in printed
    return (json.loads((out / "eval.json").read_text()), json.loads((out / "summary.json").read_text()),
            (out / "report.md").read_text())


def _check_files(out: Path, ev: dict, summary: dict, report: str) -> None:
    k = ev["num_speculative_tokens"]
    assert k == 4 and sorted(ev["acceptance_length"]) == ["1", "2", "3", "4"]
    assert summary["acceptance_length"] == ev["acceptance_length"] and summary["train_steps"] == 4
    rows = _al_rows(report)
    assert sorted(rows) == [1, 2, 3, 4]
    for kk, cells in rows.items():
        assert float(cells[1]) == pytest.approx(ev["acceptance_length"][str(kk)], abs=5e-4)
    for needle in ("Per-position acceptance", "AL per prompt kind", "mask token id", "More steps or more data",
                   "Time per stage", "autocast"):
        assert needle in report, needle
    for kind in KINDS:
        assert re.search(rf"^\| {kind} \| 2 \|", report, re.M), kind
        lines = (out / "data" / "heldout" / f"{kind}.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(x)["messages"][-1]["role"] == "user" for x in lines)
    for png in PLOTS:
        assert (out / "plots" / png).stat().st_size > 1000, png
        assert f"plots/{png}" in report
    heldout = {json.dumps(json.loads(x)["messages"]) for x in (out / "data" / "heldout.jsonl").read_text().splitlines()}
    assert len(heldout) == 10
    chats = [json.loads(x) for x in (out / "data" / "train_chats.jsonl").read_text().splitlines()]
    assert len(chats) == 24 and all(c["messages"][-1]["role"] == "assistant" for c in chats)
    trained_prompts = {json.dumps([m for m in c["messages"] if m["role"] != "assistant"]) for c in chats}
    assert not trained_prompts & {json.dumps([m for m in json.loads(h) if m["role"] != "assistant"])
                                  for h in heldout}  # held-out prompts are never trained on
    config = json.loads((out / "draft" / "config.json").read_text())
    assert config["speculators_model_type"] == "peagle" and config["draft_vocab_size"] == 4096
    assert (out / "states" / "cache_manifest.json").is_file() and "cache:" in (out / "train.yaml").read_text()
    assert summary["mask_token_id"] == 3  # SmolLM2's vocabulary is full: an unused added token


@pytest.mark.slow
def test_quick_real_demo_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without vLLM: the in-process HF engine regenerates, the evaluation is offline only."""
    _need_real_extra()
    monkeypatch.setenv(VLLM_VENV_ENV, "none")
    out = tmp_path / "demo-real-output"
    ev, summary, report = _run_quick(out, capsys)
    _check_files(out, ev, summary, report)
    assert "vllm" not in ev and summary["vllm_acceptance_length"] is None and "n/a by vLLM" in report


@pytest.mark.slow
def test_quick_real_demo_with_vllm(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With the vLLM venv: vLLM regenerates (a subprocess) and its own counters stand beside the prediction."""
    _need_real_extra()
    monkeypatch.delenv(VLLM_VENV_ENV, raising=False)
    if find_vllm_peagle() is None:
        pytest.skip("no vLLM venv (.venv-vllm: `make test-vllm` builds it)")
    out = tmp_path / "demo-real-output"
    ev, summary, report = _run_quick(out, capsys)
    _check_files(out, ev, summary, report)
    assert sorted(ev["vllm"]["by_k"]) == ["1", "2", "3", "4"]
    assert summary["vllm_acceptance_length"]["4"] == ev["vllm"]["by_k"]["4"]["acceptance_length"]
    assert "vLLM AL" in report and "vLLM (subprocess" in report
