"""One P-EAGLE training step (forward, backward, clip, AdamW) per sequence length, vs baselines.

For each L (and each sequence-partition count S) a fresh child process builds the benchmark draft
(4 layers, hidden 256, 4 heads / 2 kv heads, head_dim 64, intermediate 688, vocab 4096, K = 8,
r = 0.7, r_min = 0.2), a random tiny Llama target that supplies aux states and target logits for one
document of L tokens, and times steps. Printed per L: median step seconds, COD elements/s, peak
RSS, the same step through the dense-mask SDPA reference path (in the same run) as a ratio, and the
FLOP floor: the step's exact FLOPs (linear layers + only the (query, key) pairs the COD mask allows)
divided by this machine's measured fp32 matmul rate.

    python benchmarks/step.py [--lengths 512 1024 2048 4096] [--partitions 1 4] [--json FILE]

`--json` writes the peer bench schema (`{"peer": "peagle", "runs": [...]}`) for
`../shared/peer-bench/report.py`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS, K = 256, 4, 2, 64, 688, 4096, 4, 8


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_rate(seconds: float = 1.0) -> float:
    """Measured fp32 matmul FLOP/s on this machine (the best of a few large GEMMs)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - t0))
    return best


def step_flops(anchor: torch.Tensor, depth: torch.Tensor, supervised: int, docs: torch.Tensor) -> float:
    """Exact FLOPs of forward + backward (3× forward for matmuls) for one COD sample."""
    from peagle.cod import document_starts

    m = anchor.numel()
    qkv_in = [2 * HIDDEN] + [HIDDEN] * (LAYERS - 1)
    per_elem = 0
    for d_in in qkv_in:
        per_elem += d_in * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * INTER
    linear = 2 * m * per_elem + 2 * docs.numel() * 3 * HIDDEN * HIDDEN + 2 * supervised * HIDDEN * VOCAB
    starts = document_starts(docs)
    pairs = int((anchor - starts[anchor] + 1).sum() + depth.sum())  # depth-0 prefix + own chain (1..d)
    attention = LAYERS * pairs * HEADS * HEAD_DIM * 2 * 2
    return 3.0 * (linear + attention)


def build(L: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peagle import Batch, DraftConfig, PEagleDraft

    torch.manual_seed(seed)
    tcfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                       intermediate_size=INTER, vocab_size=VOCAB, num_hidden_layers=8, max_position_embeddings=8192)
    target = LlamaForCausalLM(tcfg).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(10)
        ids = torch.randint(0, VOCAB - 1, (1, L + 1))
        out = target(ids, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in (2, 4, 5)], -1)
    batch = Batch(input_ids=ids[:, 1:], aux_hidden=aux[:, :-1], loss_mask=torch.ones(1, L, dtype=torch.bool),
                  document_ids=torch.zeros(1, L, dtype=torch.long), target_logits=out.logits[:, 1:].contiguous(),
                  cod_seeds=torch.full((1, L), seed))
    del target, out
    cfg = DraftConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      intermediate_size=INTER, vocab_size=VOCAB, num_hidden_layers=LAYERS, mask_token_id=VOCAB - 1,
                      max_position_embeddings=8192)
    return PEagleDraft(cfg), batch


def child(L: int, attention: str, partitions: int, steps: int, budget_s: float, seed: int) -> dict:
    from peagle import PEagleTrainer

    torch.manual_seed(seed)
    draft, batch = build(L, seed)
    trainer = PEagleTrainer(draft, num_depths=K, ratio=0.7, ratio_min=0.2, sequence_partitions=partitions,
                            attention=attention)
    opt = torch.optim.AdamW(trainer.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.0)
    rss_before = peak_rss_mib()
    lay = trainer._layout(batch)
    sampled, supervised = lay.anchor.numel(), int(lay.supervised.sum())
    records, t_start = [], time.perf_counter()
    while len(records) < steps and (len(records) < 3 or time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum, fwd, bwd = 0.0, 0.0, 0.0
        plan = trainer.plan(batch) if partitions > 1 else None
        units = range(len(plan.units)) if plan else [None]
        for i in units:
            f0 = time.perf_counter()
            out = trainer(batch, segment=(plan, i)) if plan else trainer(batch)
            f1 = time.perf_counter()
            out.loss.backward()
            fwd, bwd = fwd + f1 - f0, bwd + time.perf_counter() - f1
            loss_sum += float(out.loss)
        o0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        opt.step()
        t1 = time.perf_counter()
        records.append({"step_s": t1 - t0, "fwd_s": fwd, "bwd_s": bwd, "opt_s": t1 - o0, "loss": loss_sum})
    timed = records[1:] if len(records) > 3 else records
    med = statistics.median([r["step_s"] for r in timed])
    flops = step_flops(lay.anchor, lay.depth, supervised, lay.docs)
    losses = [r["loss"] for r in records]
    return {
        "L": L, "variant_label": f"{attention} S={partitions}", "attention": attention, "partitions": partitions,
        "sampled_median": sampled, "supervised": supervised, "median_step_s": med,
        "median_fwd_s": statistics.median([r["fwd_s"] for r in timed]),
        "median_bwd_s": statistics.median([r["bwd_s"] for r in timed]),
        "median_opt_s": statistics.median([r["opt_s"] for r in timed]), "median_mask_s": 0.0,
        "elements_per_s": sampled / med, "peak_rss_mib": peak_rss_mib(), "rss_before_train_mib": rss_before,
        "step_flops": flops, "steps": len(records), "losses": losses, "loss_first": losses[0],
        "loss_last": losses[-1], "loss_decreased": losses[-1] < losses[0],
    }


def run_child(args, L: int, attention: str, partitions: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(L), attention, str(partitions), "--steps", str(args.steps),
           "--budget-s", str(args.budget_s), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    tail = (proc.stderr.strip().splitlines() or [f"rc={proc.returncode}"])[-1]
    return {"L": L, "variant_label": f"{attention} S={partitions}", "error": tail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--partitions", type=int, nargs="+", default=[1])
    p.add_argument("--baseline", default="dense", help="reference attention path run beside ours ('none' to skip)")
    p.add_argument("--baseline-max-L", type=int, default=2048, help="skip the dense baseline above this L")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        L, attention, partitions = int(args.child[0]), args.child[1], int(args.child[2])
        print("RESULT_JSON " + json.dumps(child(L, attention, partitions, args.steps, args.budget_s, args.seed)))
        return
    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.0f} GFLOP/s  (threads={torch.get_num_threads()})")
    print("| L | S | COD elements | step s | elements/s | peak RSS MiB | FLOP floor s | step/floor "
          "| dense-SDPA step s | dense/ours | dense RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    runs = []
    for L in args.lengths:
        base = None
        if args.baseline != "none" and L <= args.baseline_max_L:
            base = run_child(args, L, args.baseline, 1)
            runs.append(base)
        for s in args.partitions:
            r = run_child(args, L, "structured", s)
            runs.append(r)
            if "error" in r:
                print(f"| {L} | {s} | FAILED: {r['error']} |")
                continue
            floor = r["step_flops"] / rate
            r["flop_floor_s"] = floor
            b = base if base and "error" not in base else None
            print(f"| {L} | {s} | {r['sampled_median']} | {r['median_step_s']:.3f} | {r['elements_per_s']:.0f} | "
                  f"{r['peak_rss_mib']:.0f} | {floor:.3f} | {r['median_step_s'] / floor:.2f} | "
                  + (f"{b['median_step_s']:.3f} | {b['median_step_s'] / r['median_step_s']:.2f} | "
                     f"{b['peak_rss_mib']:.0f} |" if b else "- | - | - |"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peer": "peagle", "matmul_flops_per_s": rate, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
