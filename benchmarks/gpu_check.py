"""The checks only a GPU can answer, as one command that fits a 10-minute device lease.

    python benchmarks/gpu_check.py [--lengths 2048 8192] [--steps 6] [--target DIR --draft DIR --prompts FILE]

1. **flex vs structured in bf16**: one training step (bf16 autocast, fp32 master weights) with compiled
   FlexAttention and with the structured path on the same batch: loss within 2 % and every gradient
   with cosine > 0.99 (the bounds of tests/unit/model/test_bf16.py: bf16 rounding, not a mask error).
2. **step time and memory** at each L (benchmarks/step.py's target and draft shapes), bf16, flex and
   structured: median step seconds and peak GPU memory (torch.cuda.max_memory_allocated).
   speculators is not run here: its peer venv (../shared/peer-bench) needs the network to install and
   its bench script is CPU-only; `python benchmarks/step.py --peer speculators --dtype bf16` compares
   on CPU.
3. **the real-model draft in CUDA vLLM** (with --target/--draft/--prompts and vLLM installed): vLLM's
   spec-decode counters beside peagle's offline prediction (`peagle eval --engine vllm`, bf16).

On a CPU it runs what it can so it stays tested (1: structured vs dense, flex has no CPU backward in
torch 2.13; 2: structured at the first L only, peak RSS) and says what it skipped and why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step import build, make_trainer  # noqa: E402  (the step benchmark's shapes: one definition)


def _step(trainer, batch) -> float:
    """One bf16 training step's loss (gradients left in the parameters)."""
    loss = 0.0
    for unit in trainer.units(batch):
        with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16):
            out = trainer(unit)
        out.loss.backward()
        loss += float(out.loss.detach())
    return loss


def _to(batch, device):
    return type(batch)(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(batch).items()})


def check_paths(device: torch.device, L: int) -> dict:
    """Section 1: the fast path against the structured one on one batch, bf16."""
    fast = "flex" if device.type == "cuda" else "dense"
    draft, batch = build(L, 0)
    batch = _to(batch, device)
    results = {}
    for attention in ("structured", fast):
        torch.manual_seed(0)
        trainer = make_trainer(draft.to(device), attention, 1)
        trainer.zero_grad(set_to_none=True)
        loss = _step(trainer, batch)
        results[attention] = (loss, {n: p.grad.float().flatten() for n, p in trainer.named_parameters()
                                     if p.grad is not None})
    (l_s, g_s), (l_f, g_f) = results["structured"], results[fast]
    worst = min(float(torch.nn.functional.cosine_similarity(g_s[n], g_f[n], dim=0)) for n in g_s if g_s[n].norm() > 0)
    ok = abs(l_f / l_s - 1) < 2e-2 and worst > 0.99 and g_s.keys() == g_f.keys()
    return {"L": L, "paths": f"structured vs {fast}", "loss_structured": l_s, f"loss_{fast}": l_f,
            "worst_grad_cosine": worst, "ok": ok}


def time_steps(device: torch.device, L: int, attention: str, steps: int) -> dict:
    """Section 2: median bf16 step time and peak memory of one path at one L."""
    draft, batch = build(L, 0)
    batch = _to(batch, device)
    trainer = make_trainer(draft.to(device), attention, 1)
    opt = torch.optim.AdamW(trainer.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _step(trainer, batch)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"L": L, "attention": attention, "median_step_s": statistics.median(times[1:] or times),
            "first_step_s": times[0], "peak_mib": peak, "memory": "GPU allocated" if device.type == "cuda" else "RSS"}


def served(args) -> dict:
    """Section 3: `peagle eval --engine vllm --dtype bf16` on the real-model draft; its exit code and JSON."""
    import subprocess

    out = Path(args.out) / "vllm_eval.json"
    cmd = [sys.executable, "-m", "peagle.cli", "eval", "--target", args.target, "--draft", args.draft,
           "--prompts", args.prompts, "--max-new-tokens", str(args.max_new_tokens), "--engine", "vllm",
           "--dtype", "bf16", "--json", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = json.loads(out.read_text()) if out.exists() else {}
    return {"command": " ".join(cmd), "exit_code": proc.returncode, "vllm": result.get("vllm"),
            "acceptance_length": result.get("acceptance_length"), "stderr_tail": proc.stderr[-2000:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--target", default=None, help="the real target directory (section 3)")
    p.add_argument("--draft", default=None, help="its exported draft (section 3)")
    p.add_argument("--prompts", default=None, help="held-out prompts JSONL (section 3)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="gpu_check_out", help="folder for the JSON results")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                    "skipped": []}
    print(f"device: {report['device']}, torch {torch.__version__}")

    report["paths"] = check_paths(device, 1024 if cuda else 256)
    print(f"[1] bf16 step, {report['paths']['paths']}: {json.dumps(report['paths'])}")
    if not cuda:
        report["skipped"].append("1: compiled FlexAttention (no CPU backward in torch 2.13): dense stood in")

    lengths = args.lengths if cuda else [512]
    paths = ("flex", "structured") if cuda else ("structured",)
    report["steps"] = []
    for L in lengths:
        for attention in paths:
            r = time_steps(device, L, attention, args.steps if cuda else 2)
            report["steps"].append(r)
            print(f"[2] L={L} {attention} bf16: median step {r['median_step_s']:.3f} s, peak {r['memory']} "
                  f"{r['peak_mib']:.0f} MiB")
    if not cuda:
        report["skipped"].append(f"2: CUDA step times at L = {args.lengths}: ran L = 512 on CPU instead")
    report["skipped"].append("2: speculators on CUDA (its peer venv needs the network; its bench is CPU-only)")

    have_vllm = importlib.util.find_spec("vllm") is not None
    if cuda and have_vllm and args.target and args.draft and args.prompts:
        report["vllm"] = served(args)
        print(f"[3] vLLM bf16: exit {report['vllm']['exit_code']}, {json.dumps(report['vllm']['vllm'])}")
    else:
        why = ("no CUDA" if not cuda else "vLLM not installed" if not have_vllm
               else "--target/--draft/--prompts not given")
        report["skipped"].append(f"3: the real-model draft in CUDA vLLM ({why})")
    for line in report["skipped"]:
        print(f"skipped {line}")
    path = Path(args.out) / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    sys.exit(0 if report["paths"]["ok"] else 1)


if __name__ == "__main__":
    main()
