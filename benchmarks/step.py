"""One P-EAGLE training step (forward, backward, clip, AdamW) per sequence length, vs baselines.

For each L (and each sequence-partition count S) a fresh child process builds the benchmark draft
(4 layers, hidden 256, 4 heads / 2 kv heads, head_dim 64, intermediate 688, vocab 4096, K = 8,
r = 0.7, r_min = 0.2), a random tiny Llama target that supplies aux states and target logits for one
document of L tokens, and times steps. Printed per L: median step seconds, COD elements/s, peak
RSS, the same step through the dense-mask SDPA reference path (in the same run) as a ratio, and the
FLOP floor: the step's exact FLOPs (linear layers + only the (query, key) pairs the COD mask allows)
divided by this machine's measured fp32 matmul rate.

    python benchmarks/step.py [--lengths 512 1024 2048 4096] [--partitions 1 4] [--json FILE]
    python benchmarks/step.py --peer speculators [--lengths 512 1024 2048] [--partitions 1 8] [--rounds 2] [--json FILE]

`--json` writes the peer bench schema (`{"peer": "peagle", "runs": [...]}`) for
`../shared/peer-bench/report.py`.

`--peer speculators` also runs speculators' P-EAGLE trainer (speculators==0.9.0) in the same invocation,
by calling `<repo>/../shared/peer-bench/peer_speculators.py --attn sdpa` (`--peer-bench DIR`,
`--peer-attn`) with the peer venv's python (`~/.cache/peagle-peer-bench/venv/bin/python`, `--peer-python`;
`bash ../shared/peer-bench/setup_venv.sh` creates it) at the same L and the same target/draft sizes
(checked against what peer_speculators.py builds; any mismatch is printed). Per L, peagle's first S and
speculators run back to back (alternating which goes first), then the other peagle runs; each run in its
own process. One table per L: peagle step s and peak RSS, speculators step s and peak RSS, the
peagle/speculators ratios and peagle's step/FLOP floor. The dense baseline is off unless `--baseline
dense`. `--json FILE` also writes speculators' result in the peer-bench schema to FILE's stem +
`.speculators.json`, so `report.py DIR` lists both.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from peagle.util.machine import bf16_speedup, keep_freed_memory, matmul_rate

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS, K = 256, 4, 2, 64, 688, 4096, 4, 8
TARGET_LAYERS, AUX_LAYERS, LOGIT_SCALE, RATIO, RATIO_MIN, LR = 8, (2, 4, 5), 10.0, 0.7, 0.2, 6e-4


# What caps torch's CPU kernels at one ISA: ATen's vectorised kernels, MKL's GEMMs, oneDNN's primitives.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_flops(anchor: torch.Tensor, depth: torch.Tensor, supervised: int, docs: torch.Tensor) -> float:
    """Exact FLOPs of forward + backward (3× forward for matmuls) for one COD sample."""
    from peagle.model.cod import document_starts

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
                       intermediate_size=INTER, vocab_size=VOCAB, num_hidden_layers=TARGET_LAYERS,
                       max_position_embeddings=8192)
    target = LlamaForCausalLM(tcfg).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(LOGIT_SCALE)
        ids = torch.randint(0, VOCAB - 1, (1, L + 1))
        out = target(ids, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in AUX_LAYERS], -1)
    batch = Batch(input_ids=ids[:, 1:], aux_hidden=aux[:, :-1], loss_mask=torch.ones(1, L, dtype=torch.bool),
                  document_ids=torch.zeros(1, L, dtype=torch.long), target_logits=out.logits[:, 1:].contiguous(),
                  cod_seeds=torch.full((1, L), seed))
    del target, out
    cfg = DraftConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      intermediate_size=INTER, vocab_size=VOCAB, num_hidden_layers=LAYERS, mask_token_id=VOCAB - 1,
                      max_position_embeddings=8192, num_speculative_tokens=K)
    return PEagleDraft(cfg), batch


def make_trainer(draft, attention: str, partitions: int):
    """PEagleTrainer with the benchmark's COD settings (K is the draft's num_speculative_tokens)."""
    from peagle import PEagleTrainer

    return PEagleTrainer(draft, ratio=RATIO, ratio_min=RATIO_MIN, sequence_partitions=partitions, attention=attention)


def step_forwards(trainer, batch):
    """The forwards of one training step as zero-argument callables (COD sampling included, as in
    the peers' steps): one per unit of `trainer.units(batch)`."""
    for unit in trainer.units(batch):
        yield lambda unit=unit: trainer(unit)


def child(L: int, attention: str, partitions: int, steps: int, budget_s: float, seed: int,
          dtype: str = "fp32") -> dict:
    keep_freed_memory()  # as `peagle train` runs
    torch.manual_seed(seed)
    draft, batch = build(L, seed)
    trainer = make_trainer(draft, attention, partitions)
    opt = torch.optim.AdamW(trainer.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    rss_before = peak_rss_mib()
    lay = trainer.layout(batch)
    sampled, supervised = lay.anchor.numel(), int(lay.supervised.sum())
    records, t_start = [], time.perf_counter()
    while len(records) < steps and (len(records) < 3 or time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum, fwd, bwd = 0.0, 0.0, 0.0
        for forward in step_forwards(trainer, batch):
            f0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):  # as `peagle train`
                out = forward()
            f1 = time.perf_counter()
            out.loss.backward()
            fwd, bwd = fwd + f1 - f0, bwd + time.perf_counter() - f1
            loss_sum += float(out.loss.detach())
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
        "L": L, "variant_label": f"{attention} S={partitions}" + (" bf16" if dtype == "bf16" else ""),
        "attention": attention, "partitions": partitions, "dtype": dtype,
        "sampled_median": sampled, "supervised": supervised, "median_step_s": med,
        "median_fwd_s": statistics.median([r["fwd_s"] for r in timed]),
        "median_bwd_s": statistics.median([r["bwd_s"] for r in timed]),
        "median_opt_s": statistics.median([r["opt_s"] for r in timed]), "median_mask_s": 0.0,
        "elements_per_s": sampled / med, "peak_rss_mib": peak_rss_mib(), "rss_before_train_mib": rss_before,
        "step_flops": flops, "steps": len(records), "losses": losses, "loss_first": losses[0],
        "loss_last": losses[-1], "loss_decreased": losses[-1] < losses[0],
        "params_total": sum(p.numel() for p in trainer.parameters()),
        "params_trainable": sum(p.numel() for p in trainer.parameters() if p.requires_grad),
    }


def run_child(args, L: int, attention: str, partitions: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(L), attention, str(partitions), "--steps", str(args.steps),
           "--budget-s", str(args.budget_s), "--seed", str(args.seed), "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    tail = (proc.stderr.strip().splitlines() or [f"rc={proc.returncode}"])[-1]
    return {"L": L, "variant_label": f"{attention} S={partitions}", "error": tail}


PEER_SCRIPTS = {"speculators": "peer_speculators.py"}
# peagle's benchmark sizes as peer_speculators.py options (head_dim is not an option there: hidden // heads)
PEER_SIZE_ARGS = {"hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "intermediate": INTER, "vocab": VOCAB,
                  "target_layers": TARGET_LAYERS, "target_logit_scale": LOGIT_SCALE, "draft_layers": LAYERS,
                  "num_depths": K, "ratio": RATIO, "ratio_min": RATIO_MIN}
OURS = {**PEER_SIZE_ARGS, "head_dim": HEAD_DIM, "aux_layers": list(AUX_LAYERS)}
PEER_ARGS = {**PEER_SIZE_ARGS, "lr": LR}  # passed to every peer run
# Runs in the peer venv: which speculators it has, and the target/draft shapes peer_speculators.py builds
# (with its defaults, and with the size options passed to it), read from peer-bench's own _common.
PEER_PROBE = r"""
import argparse, importlib.metadata as md, json, sys
sys.path.insert(0, sys.argv[1])
import _common as C
def shapes(argv):
    p = argparse.ArgumentParser(); C.add_model_args(p); a = p.parse_args(argv); t = C.tiny_llama_config(a)
    return {"hidden": t.hidden_size, "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "intermediate": t.intermediate_size, "vocab": t.vocab_size,
            "target_layers": t.num_hidden_layers, "aux_layers": C.aux_layer_ids(a.target_layers),
            "target_logit_scale": a.target_logit_scale, "draft_layers": a.draft_layers,
            "num_depths": a.num_depths, "ratio": a.ratio, "ratio_min": a.ratio_min}
print("PROBE_JSON " + json.dumps({"versions": {k: md.version(k) for k in ("speculators", "torch", "transformers")},
                                  "default": shapes([]), "passed": shapes(sys.argv[2:])}))
"""


def peer_argv() -> list[str]:
    return [a for k, v in PEER_ARGS.items() for a in ("--" + k.replace("_", "-"), str(v))]


def peer_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def resolve_peer(args) -> tuple[Path, Path, dict]:
    """The peer bench folder, the peer venv's python and what the probe found; one-line exit on a problem."""
    repo = Path(__file__).resolve().parents[1]
    bench = Path(args.peer_bench) if args.peer_bench else repo.parent / "shared" / "peer-bench"
    script = bench / PEER_SCRIPTS[args.peer]
    setup = os.path.relpath(bench / "setup_venv.sh")
    if not script.is_file():
        sys.exit(f"step.py: error: no {script.name} in {bench} (point --peer-bench at the peer-bench folder)")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    python = Path(args.peer_python) if args.peer_python else cache / "peagle-peer-bench" / "venv" / "bin" / "python"
    if not python.exists():
        sys.exit(f"step.py: error: no peer venv python at {python}: run `bash {setup}` first (or pass --peer-python)")
    proc = subprocess.run([str(python), "-c", PEER_PROBE, str(bench), *peer_argv()], capture_output=True,
                          text=True, env=peer_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE_JSON ")]
    if proc.returncode or not lines:
        why = (proc.stderr.strip().splitlines() or [f"rc={proc.returncode}"])[-1]
        sys.exit(f"step.py: error: {python} cannot run the {args.peer} peer ({why}): run `bash {setup}`")
    return script, python, json.loads(lines[-1][len("PROBE_JSON "):])


def shape_report(probe: dict) -> list[str]:
    """Mismatches between peagle's benchmark shapes and what peer_speculators.py builds (passed / default)."""
    out = []
    for k, ours in OURS.items():
        got, default = probe["passed"].get(k), probe["default"].get(k)
        if got != ours:
            out.append(f"SHAPE MISMATCH {k}: peagle {ours}, speculators {got}")
        elif default != ours:
            out.append(f"note: peer_speculators.py's default {k} is {default}; it is passed peagle's {ours}")
    return out


def run_peer(args, script: Path, python: Path, L: int) -> tuple[dict, dict | None]:
    """One peer_speculators.py invocation for one L (its own child process): (run, its config)."""
    cmd = [str(python), str(script), "--attn", args.peer_attn, "--lengths", str(L), "--steps", str(args.steps),
           "--min-steps", "3", "--budget-s", str(args.budget_s), "--warmup", "1" if args.steps > 3 else "0",
           "--seed", str(args.seed), "--dtype", args.dtype, *peer_argv()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_env())
    res = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON ")]
    if proc.returncode or not res:
        tail = (proc.stderr.strip().splitlines() or [f"rc={proc.returncode}"])[-1]
        return {"L": L, "variant_label": args.peer_attn, "error": tail}, None
    out = json.loads(res[-1][len("RESULT_JSON "):])
    run = out["runs"][0] if out.get("runs") else {"L": L, "variant_label": args.peer_attn, "error": "no runs"}
    return run, out.get("config")


def faster(a: dict | None, b: dict) -> dict:
    """Of two runs of the same job, the one with the lower median step (a failed run loses)."""
    if a is None or "error" in a:
        return b
    if "error" in b:
        return a
    return b if b["median_step_s"] < a["median_step_s"] else a


def config_report(cfg: dict, threads: int) -> list[str]:
    """What the peer's result says it ran, against what it was asked for."""
    out = [f"SHAPE MISMATCH {k}: passed {v}, speculators ran {cfg.get(k)}"
           for k, v in PEER_ARGS.items() if cfg.get(k) != v]
    if cfg.get("sliding_window"):
        out.append(f"SHAPE MISMATCH attention: speculators ran sliding window {cfg['sliding_window']}, peagle full")
    if cfg.get("inputs", "target") != "target":
        out.append(f"MISMATCH inputs: speculators used {cfg['inputs']} aux states, peagle the target's")
    if cfg.get("torch_threads") != threads:
        out.append(f"note: torch threads peagle {threads}, speculators {cfg.get('torch_threads')}")
    return out


def params_report(ours: dict, peer: dict) -> str:
    """Same draft? speculators holds the same tensors plus the target's frozen lm_head + final norm (it computes
    the target logits in its forward) and freezes its draft lm_head (a copy of the target's)."""
    head, norm = VOCAB * HIDDEN, HIDDEN
    pt, ptr = peer.get("params_total"), peer.get("params_trainable")
    if pt == ours["params_total"] + head + norm and ptr == ours["params_trainable"] - head:
        return (f"draft parameters match: peagle {ours['params_total']:,} ({ours['params_trainable']:,} trainable); "
                f"speculators {pt:,} = the same + the target's frozen lm_head/norm ({head + norm:,}), "
                f"{ptr:,} trainable (its draft lm_head is the target's, frozen; peagle trains its lm_head)")
    return (f"DRAFT MISMATCH: peagle {ours['params_total']:,} params ({ours['params_trainable']:,} trainable), "
            f"speculators {pt} ({ptr} trainable)")


def main_peer(args, baseline: str) -> None:
    script, python, probe = resolve_peer(args)
    rate = matmul_rate()
    threads = torch.get_num_threads()
    v = probe["versions"]
    print(f"fp32 matmul rate: {rate / 1e9:.0f} GFLOP/s  (threads={threads}); steps in {args.dtype}"
          + (f", bf16 matmul {bf16_speedup():.1f}x fp32 here" if args.dtype == "bf16" else ""))
    print(f"peer: speculators {v['speculators']} `{script.name} --attn {args.peer_attn}` "
          f"(torch {v['torch']}, transformers {v['transformers']}) via {python}")
    print(f"peagle: torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}")
    shapes = shape_report(probe) or [
          f"shapes match peer_speculators.py: target {TARGET_LAYERS} layers, hidden {HIDDEN}, {HEADS} heads / "
          f"{KV_HEADS} kv, head_dim {HEAD_DIM}, intermediate {INTER}, vocab {VOCAB}, aux layers "
          f"{list(AUX_LAYERS)}, lm_head x{LOGIT_SCALE:g}; draft {LAYERS} layers, K = {K}, r = {RATIO}, "
          f"r_min = {RATIO_MIN}, full attention"]
    print("\n".join(shapes))
    precision = "bf16 autocast, fp32 master weights" if args.dtype == "bf16" else "fp32"
    print("not the same work: speculators computes the target logits in its forward (peagle gets them as input), "
          f"freezes its lm_head (peagle trains it); token ids differ (same shapes). Both: {precision}, one document, "
          "step = forward (COD sampling included) + backward + clip + AdamW; median over steps 2.. "
          "(peagle keeps step 1 when only 3 steps ran)")
    print(f"order per L: peagle S={args.partitions[0]} and speculators back to back (alternating which goes "
          "first), then the other peagle runs; every run in its own process"
          + (f"; {args.rounds} rounds, each side's fastest run kept" if args.rounds > 1 else "") + "\n", flush=True)
    runs, peer_runs, peer_cfg, checked = [], [], None, False
    for i, L in enumerate(args.lengths):
        jobs = [("structured", s) for s in args.partitions]
        if baseline != "none" and L <= args.baseline_max_L:
            jobs.append((baseline, 1))
        with_peer = args.peer_max_L is None or L <= args.peer_max_L
        ours, peer = {}, None
        for rnd in range(args.rounds):
            order = list(jobs)
            if with_peer:
                order.insert(1 if (i + rnd) % 2 == 0 else 0, None)
            for job in order:
                what = f"speculators {args.peer_attn}" if job is None else f"peagle {job[0]} S={job[1]}"
                print(f"+ L={L} {what} ...", end="", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                if job is None:
                    got, cfg = run_peer(args, script, python, L)
                    peer = faster(peer, got)
                    peer_cfg = peer_cfg or cfg
                    if cfg:
                        for line in config_report(cfg, threads):
                            if line not in shapes:
                                shapes.append(line)
                                print(line)
                else:
                    ours[job] = faster(ours.get(job), run_child(args, L, *job))
                print(f" {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if peer is not None:
            peer_runs.append(peer)
        pk = peer if peer and "error" not in peer else None
        first = next((r for r in ours.values() if "error" not in r), None)
        if pk and first and not checked:
            checked = True
            line = params_report(first, pk)
            shapes.append(line)
            print(line)
        cod = f"COD elements peagle {first['sampled_median']}" if first else "peagle failed"
        if pk:
            cod += f", speculators {pk.get('sampled_median')}"
        print(f"\nL = {L}: {cod}")
        print("| peagle run | peagle step s | peagle peak RSS MiB | speculators step s | speculators peak RSS MiB "
              "| step peagle/speculators | RSS peagle/speculators | FLOP floor s | peagle step/floor |")
        print("|---|---|---|---|---|---|---|---|---|")
        if pk:
            spec = f"{pk['median_step_s']:.3f} | {pk['peak_rss_mib']:.0f}"
        elif peer:
            spec = "FAILED | -"
        else:
            spec = f"skipped (L > --peer-max-L {args.peer_max_L}) | -"
        for job in jobs:
            r = ours[job]
            runs.append(r)
            if "error" in r:
                print(f"| {r['variant_label']} | FAILED: {r['error']} | - | {spec} | - | - | - | - |")
                continue
            floor = r["step_flops"] / rate
            r["flop_floor_s"] = floor
            ratio = "- | -"
            if pk:
                rt, rm = r["median_step_s"] / pk["median_step_s"], r["peak_rss_mib"] / pk["peak_rss_mib"]
                r["vs_peer"] = {"peer": "speculators", "variant_label": pk.get("variant_label"),
                                "median_step_s": pk["median_step_s"], "peak_rss_mib": pk["peak_rss_mib"],
                                "step_ratio": rt, "rss_ratio": rm}
                ratio = f"{rt:.2f} | {rm:.2f}"
            print(f"| {r['variant_label']} | {r['median_step_s']:.3f} | {r['peak_rss_mib']:.0f} | {spec} | {ratio} | "
                  f"{floor:.3f} | {r['median_step_s'] / floor:.2f} |")
        if peer and not pk:
            print(f"speculators FAILED at L = {L}: {peer['error']}", flush=True)
    if args.json:
        path = Path(args.json)
        peer_path = path.with_name(path.stem + f".{args.peer}" + (path.suffix or ".json"))
        with open(path, "w") as f:
            json.dump({"peer": "peagle", "matmul_flops_per_s": rate, "runs": runs,
                       "compared_with": {"peer": args.peer, "json": peer_path.name, "checks": shapes}}, f, indent=1)
        with open(peer_path, "w") as f:
            json.dump({"peer": args.peer, "config": peer_cfg, "runs": peer_runs}, f, indent=1)
        print(f"\nwrote {path} and {peer_path} (`python {os.path.relpath(script.parent / 'report.py')} "
              f"{path.parent}` tables both)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--partitions", type=int, nargs="+", default=[1])
    p.add_argument("--baseline", default=None,
                   help="reference attention path run beside ours ('none' to skip; default: dense, "
                        "or none with --peer)")
    p.add_argument("--baseline-max-L", type=int, default=2048, help="skip the dense baseline above this L")
    p.add_argument("--peer", choices=sorted(PEER_SCRIPTS), default=None,
                   help="also run this rival through ../shared/peer-bench, interleaved, and print ratios")
    p.add_argument("--peer-bench", default=None, help="peer-bench folder (default: <repo>/../shared/peer-bench)")
    p.add_argument("--peer-python", default=None,
                   help="the peer venv's python (default: ~/.cache/peagle-peer-bench/venv/bin/python)")
    p.add_argument("--peer-attn", default="sdpa", choices=("sdpa", "simple_flex_attention", "eager"),
                   help="peer_speculators.py --attn (sdpa: speculators' fastest CPU path)")
    p.add_argument("--peer-max-L", type=int, default=None, help="skip the peer above this L (default: none)")
    p.add_argument("--isa", choices=sorted(ISA_ENV), default=None,
                   help="cap every run's CPU code paths (ATen kernels, MKL, oneDNN) at this ISA, peer included: "
                        "an AVX2-only machine's kernels on this CPU (not its clock or memory)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every run this many times (alternating the peer's place) and keep each side's "
                        "fastest: this machine's speed drifts by 10-20 %% within minutes")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: every step under bf16 autocast with fp32 master weights (as train.dtype bf16), the "
                        "peer too (peer_speculators.py --dtype bf16)")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.isa and any(os.environ.get(k) != v for k, v in ISA_ENV[args.isa].items()):
        # read by torch / MKL / oneDNN at load: restart with them set (children and the peer inherit them)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_ENV[args.isa]})
    if args.isa:
        print(f"CPU code paths capped at {args.isa}: {' '.join(f'{k}={v}' for k, v in ISA_ENV[args.isa].items())}")
    if args.child:
        L, attention, partitions = int(args.child[0]), args.child[1], int(args.child[2])
        print("RESULT_JSON " + json.dumps(child(L, attention, partitions, args.steps, args.budget_s, args.seed,
                                                args.dtype)))
        return
    baseline = args.baseline or ("none" if args.peer else "dense")
    if args.peer:
        main_peer(args, baseline)
        return
    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.0f} GFLOP/s  (threads={torch.get_num_threads()}); steps in {args.dtype}"
          + (f", bf16 matmul {bf16_speedup():.1f}x fp32 here" if args.dtype == "bf16" else ""))
    print("| L | S | COD elements | step s | elements/s | peak RSS MiB | FLOP floor s | step/floor "
          "| dense-SDPA step s | dense/ours | dense RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    runs = []
    for L in args.lengths:
        base = None
        if baseline != "none" and L <= args.baseline_max_L:
            base = run_child(args, L, baseline, 1)
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
