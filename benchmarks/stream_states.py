"""Training tokens/s with the target states streamed from vLLM vs read from the vLLM cache vs the in-process
HF target, and the stream's staging-area peak (docs/large-targets.md). Run in .venv-vllm:

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/stream_states.py [--steps 40] [--hidden 256]
        [--layers 8] [--chats 400] [--max-length 256] [--json FILE]

Builds a tiny random Llama target (tokenizer trained on the tests' corpus), single- and multi-turn chats,
`peagle prepare`, the vLLM cache (timed: it is part of the cache path's cost), then three trainings with the
same config (fp32, micro-batch 4, no validation): data.states cache / stream (in-process vLLM engine, 2 steps
ahead) / online (HF target). tokens/s = tokens of steps 2..N / their step time (the first step, with its
warm-up and the engine's first answers, left out); wall = the whole `train` call (engine start included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests_vllm"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _train_once(args, root: Path, target: Path, mode: str, rnd: int, load_config, train) -> dict:
    """One training run with the states from ``mode``: tokens/s of steps 2..N, wall, the stream's stats."""
    data = {"dataset": str(root / "data"), "max_length": args.max_length, "states": mode}
    if mode == "cache":
        data["cache"] = str(root / "cache")
    out = root / f"run_{mode}_{rnd}"
    cfg = {"data": data, "model": {"target": str(target), "num_layers": 1, "num_depths": 4},
           "optim": {"lr": 1e-3},
           "train": {"output_dir": str(out), "micro_batch_size": args.micro_batch, "max_steps": args.steps,
                     "save_every": 0, "progress": False, "tensorboard": False, "device": "cpu", "dtype": "fp32"},
           "eval": {"enabled": False}}
    path = root / f"{mode}_{rnd}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    res = train(load_config(path))
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("split") != "val" and "loss" in r][1:]
    tokens, secs = sum(r["tokens"] for r in steps), sum(r["step_s"] for r in steps)
    r = {"tokens_per_s": tokens / secs, "wall_s": wall, "tokens": tokens, "loss_last": steps[-1]["loss"],
         "load": os.getloadavg()[0]}
    if res.stream:
        r["stream"] = res.stream
        r["states_wait_s"] = sum(x.get("states_wait_s", 0.0) for x in steps)
    print(f"round {rnd} {mode}: {r['tokens_per_s']:,.0f} tokens/s, wall {wall:.1f} s (load {r['load']:.2f})",
          flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--chats", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1, help="run the three modes this many times, alternating; "
                    "each mode's best tokens/s is kept (this machine's speed drifts)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from conftest import CORPUS
    from test_states import _chats

    from peagle.cli import main as cli
    from peagle.config.training import load_config
    from peagle.demo.offline_models import tiny_target, train_chat_tokenizer
    from peagle.run.train import train
    from peagle.target.vllm_states import write_vllm_cache
    from peagle.util.machine import matmul_rate

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    root = Path(tempfile.mkdtemp(prefix="peagle-stream-bench-"))
    tok = train_chat_tokenizer(CORPUS, 300, root / "tokenizer")
    target = tiny_target("llama", tok, root / "target", hidden_size=args.hidden, num_heads=args.hidden // 32,
                         num_kv_heads=max(1, args.hidden // 64), num_layers=args.layers,
                         intermediate_size=args.hidden * 2, seed=3)
    _chats(root / "chats.jsonl", args.chats)
    assert cli(["prepare", str(root / "chats.jsonl"), "--target", str(target), "--out", str(root / "data"),
                "--max-length", str(args.max_length), "--no-progress"]) == 0
    t0 = time.perf_counter()
    write_vllm_cache(target, root / "data", root / "cache", progress=False)
    cache_s = time.perf_counter() - t0
    cache_bytes = sum(p.stat().st_size for p in (root / "cache").glob("shard_*"))

    results: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for mode in ("cache", "stream", "online") if rnd % 2 == 0 else ("online", "stream", "cache"):
            r = _train_once(args, root, target, mode, rnd, load_config, train)
            if mode not in results or r["tokens_per_s"] > results[mode]["tokens_per_s"]:
                results[mode] = r
    load = os.getloadavg()
    print(f"machine: {matmul_rate() / 1e9:.0f} GFLOP/s fp32 matmul, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; target: Llama hidden {args.hidden}, {args.layers} layers; {args.chats} chats, "
          f"max_length {args.max_length}, micro-batch {args.micro_batch}, {args.steps} steps")
    print(f"vLLM cache: written in {cache_s:.1f} s, {cache_bytes / 2**20:.2f} MiB on disk")
    print("| states | training tokens/s (steps 2..N) | wall of `train` | steps waited for states |")
    print("|---|---|---|---|")
    for mode in ("cache", "stream", "online"):
        r = results[mode]
        wait = f"{r['states_wait_s']:.2f} s" if "states_wait_s" in r else "—"
        print(f"| {mode} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} s | {wait} |")
    s = results["stream"]["stream"]
    print(f"stream staging peak: {s['peak_bytes'] / 2**20:.3f} MiB ({s['peak_micro_batches']} micro-batches), "
          f"{s['extract_calls']} extraction calls in {s['extract_s']:.1f} s, {s['tokens']} tokens streamed")
    if args.json:
        Path(args.json).write_text(json.dumps({"cache_s": cache_s, "cache_bytes": cache_bytes, "load": load,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
