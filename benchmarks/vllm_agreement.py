"""How closely the real vLLM reproduces `peagle eval`'s prediction, per precision (docs/evaluation.md).

    .venv-vllm/bin/python benchmarks/vllm_agreement.py --draft DRAFT --prompts PROMPTS.jsonl \\
        [--target DIR (default: SmolLM2-135M-Instruct, peagle.target.real_model)] [--max-new-tokens 64] \\
        [--dtypes fp32 bf16] [--out DIR] [--noise]

For each precision: ``peagle eval --engine vllm --dtype D`` (HF target and draft in D offline, vLLM serving in
D; a subprocess, its JSON kept in --out) and one markdown table row per K': prompts, prompts whose outputs
differ from HF's greedy ones (near-ties / not), prompts where the draft disagrees, drafts and accepted tokens
HF vs vLLM, AL both sides, the largest margin at a differing position. With ``--noise``, also the
engines' logit noise the near-tie threshold is set against: vLLM serves the prompts at the draft's K with
logprobs=2 and, at every generated position, its top-2 margin is compared with HF's margin between the same
two tokens (HF target in the same precision, over vLLM's own output): |Δ margin| median / p99 / max, and how
many positions have a margin under each precision's threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _eval(target: str, draft: str, prompts: str, n: int, dtype: str, out: Path) -> tuple[int, float, dict]:
    js = out / f"eval_{dtype}.json"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "peagle.cli", "eval", "--target", target, "--draft", draft,
                          "--prompts", prompts, "--max-new-tokens", str(n), "--engine", "vllm", "--dtype", dtype,
                          "--device", "cpu", "--json", str(js), "--no-progress"],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"eval_{dtype}.log").write_text(res.stdout + res.stderr)
    if res.returncode not in (0, 4):
        sys.exit(f"peagle eval --dtype {dtype} failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.returncode, wall, json.loads(js.read_text())


def table(results: dict[str, tuple[int, float, dict]]) -> str:
    """The markdown table over every precision and K'."""
    head = ("| precision | K' | prompts | outputs differ (near-tie / not) | draft disagrees | drafts HF / vLLM "
            "| accepted HF / vLLM | AL HF / vLLM | largest abs. margin at a difference (HF, vLLM) | exit |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for dtype, (rc, _, data) in results.items():
        v = data["vllm"]
        n = data["num_prompts"]
        for kk, served in v["by_k"].items():
            rows = v["differences"].get(kk, [])
            hf = [abs(r["hf_margin"]) for r in rows if r.get("hf_margin") is not None]
            vl = [abs(r["vllm_margin"]) for r in rows if r.get("vllm_margin") is not None]
            margin = f"{max(hf):.3g}, {max(vl):.3g}" if hf and vl else "—"
            off = served["offline"]
            al_off = data["by_k"][kk]["acceptance_length"]
            lines.append(
                f"| {dtype} | {kk} | {n} | {served['outputs_differ']} ({served['near_ties']} / "
                f"{served['not_near_ties']}) | {served['draft_disagreements']} | {off['num_drafts']} / "
                f"{served['num_drafts']} | {off['num_accepted_tokens']} / {served['num_accepted_tokens']} | "
                f"{al_off:.3f} / {served['acceptance_length']:.3f} | {margin} | {rc} |")
    return "\n".join(lines)


def noise(target: str, draft: str, prompts: str, n: int, dtype: str) -> dict[str, Any]:
    """|Δ top-2 margin| between vLLM and HF at every position vLLM generated (same tokens on both sides)."""
    import torch

    from peagle.eval.agreement import NEAR_TIE
    from peagle.eval.prompts import load_prompts, stop_token_ids, tokenize_prompts
    from peagle.model.draft import PEagleDraft
    from peagle.target.hf import Target
    from peagle.target.vllm_engine import served_counters

    k = int(PEagleDraft.from_pretrained(draft).config.num_speculative_tokens)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    t = Target(target, device="cpu", dtype=torch_dtype)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    ids = tokenize_prompts(tok, load_prompts(prompts))
    served = served_counters(target, draft, ids, [n] * len(ids), stop_token_ids(t, tok), [k],
                             max_model_len=max(len(p) for p in ids) + n + 64,
                             dtype="bfloat16" if dtype == "bf16" else "float32", logprobs=2)[k]
    deltas, margins = [], []
    with torch.no_grad():
        for p, out, lps in zip(ids, served["outputs"], served["logprobs"], strict=True):
            logits = t.model(input_ids=torch.tensor([p + out])).logits[0].float()
            for c, top in enumerate(lps):
                (a, la), (b, lb) = sorted(top.items(), key=lambda tv: -tv[1])[:2]
                row = logits[len(p) + c - 1]
                hf = float(row[a] - row[b])
                deltas.append(abs((la - lb) - hf))
                margins.append(la - lb)
    d = torch.tensor(deltas)
    m = torch.tensor(margins)
    return {"positions": len(deltas), "median": float(d.median()), "p99": float(d.quantile(0.99)),
            "max": float(d.max()), **{f"margin<={thr:g}": int((m <= thr).sum()) for thr in sorted(NEAR_TIE.values())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--out", default="vllm-agreement")
    ap.add_argument("--noise", action="store_true", help="also measure the engines' margin noise per precision")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    target = args.target
    if target is None:
        from peagle.target.real_model import smollm2_dir

        target = str(smollm2_dir())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for dtype in args.dtypes:
        results[dtype] = _eval(target, args.draft, args.prompts, args.max_new_tokens, dtype, out)
        print(f"{dtype}: peagle eval --engine vllm exit {results[dtype][0]}, {results[dtype][1]:.0f} s", flush=True)
    text = table(results)
    if args.noise:
        rows = ["", "| precision | positions | abs. Δ margin median | p99 | max | margins ≤ 0.05 | ≤ 1.0 |",
                "|---|---|---|---|---|---|---|"]
        for dtype in args.dtypes:
            s = noise(target, args.draft, args.prompts, args.max_new_tokens, dtype)
            rows.append(f"| {dtype} | {s['positions']} | {s['median']:.2g} | {s['p99']:.2g} | {s['max']:.2g} | "
                        f"{s['margin<=0.05']} | {s['margin<=1']} |")
        text += "\n" + "\n".join(rows)
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
