"""benchmarks/quality.py --quick end to end against the real vLLM: prepare (vLLM's extraction), the batch plan,
``peagle train`` on it, export, and vLLM's counters split per held-out file — on one of the suite's tiny targets.

speculators is not driven here (its venv is the benchmark's, not the suite's): the peer path is exercised by the
benchmark's own runs (README, "Draft quality").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
K = 2
BUDGET = 3000


def test_quick_run_scores_every_draft_per_held_out_file(cases, tmp_path: Path) -> None:
    case = cases["llama-vocab200"]
    lines = case.prompts.read_text().splitlines()
    held = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    held[0].write_text("\n".join(lines[:5]) + "\n")
    held[1].write_text("\n".join(lines[5:11]) + "\n")
    out = tmp_path / "q.json"
    argv = [sys.executable, SCRIPT, "--quick", "--target", case.target, "--chats", case.target.parent / "chats.jsonl",
            "--heldout", *held, "--tokens", BUDGET, "--k", K, "--draft-vocab-size", 200, "--json", out,
            "--vllm-python", sys.executable, "--ablate", "same=train.seed=0",
            "--ablate", "depths=model.loss_normalization=depths"]
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    res = json.loads(out.read_text())
    work = tmp_path / "q"

    # one row per trainer x budget x held-out file: the equal-token run and the two ablations, no peer
    rows = {(r.get("ablation", r["trainer"] + "/" + r["budget"]), r["heldout"]): r for r in res["runs"]}
    assert set(rows) == {(name, f) for name in ("peagle/tokens", "same", "depths") for f in ("first", "second")}
    for (name, heldout), r in rows.items():
        # --quick takes 4 prompts per file: every one of them ran 16 new tokens at least partly drafted
        assert r["num_drafts"] >= 4, (name, heldout)
        assert r["acceptance_length"][str(K)] == 1 + r["num_accepted_tokens"] / r["num_drafts"]
        assert 1.0 <= r["acceptance_length"][str(K)] <= K + 1
    assert set(rows["peagle/tokens", "first"]["acceptance_length"]) == {"1", "2"}  # K' = 1..K for the main run
    # the files split vLLM's counters: together they are the aggregate engine's (checked inside per_file too)
    # and the budget is met by the fewest plan steps: the run's own per-step token counts say so
    metrics = [json.loads(x) for x in (work / "peagle-tokens" / "run" / "metrics.jsonl").read_text().splitlines()
               if '"step_s"' in x]
    tokens = [m["tokens"] for m in metrics]
    assert sum(tokens) >= BUDGET > sum(tokens[:-1])
    assert rows["peagle/tokens", "first"]["train_tokens"] == sum(tokens)
    # an ablation that changes nothing retrains the same draft bit for bit, and vLLM counts it the same
    a = (work / "peagle-tokens" / f"export-{len(tokens):06d}" / "model.safetensors").read_bytes()
    b = (work / "ablation-same" / f"export-{len(tokens):06d}" / "model.safetensors").read_bytes()
    assert a == b
    for f in ("first", "second"):
        assert rows["same", f]["num_accepted_tokens"] == rows["peagle/tokens", f]["num_accepted_tokens"]
        assert rows["same", f]["num_drafts"] == rows["peagle/tokens", f]["num_drafts"]
    # the per-depth normalisation trains a different draft from the same batches
    c = (work / "ablation-depths" / f"export-{len(tokens):06d}" / "model.safetensors").read_bytes()
    assert c != a
    # the curve: one intermediate checkpoint, then the final one (whose AL is the main run's mean)
    curve = res["curve"]["peagle"]
    assert len(curve) == 2 and curve[0][0] < curve[1][0] == sum(tokens)
    mean = sum(rows["peagle/tokens", f]["acceptance_length"][str(K)] for f in ("first", "second")) / 2
    assert abs(curve[1][1] - mean) < 1e-12
    assert out.with_suffix(".md").read_text().startswith("# Draft quality")
    assert out.with_suffix(".png").stat().st_size > 0
