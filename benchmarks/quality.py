"""Draft quality against speculators at equal training tokens and equal wall-clock, by the real vLLM's counters.

    python benchmarks/quality.py --target DIR --chats FILE --heldout FILE [--heldout FILE ...] --tokens N \\
        [--peer speculators] [--peer-bench DIR] [--k 4] [--layers 1] --json OUT \\
        [--work DIR] [--prepared DIR --states DIR] [--draft-vocab-size 16384] [--max-length 1024] \\
        [--heldout-limit 12] [--max-new-tokens 128] [--curve 3] [--ablate NAME=key=value,...] [--quick]

1. The chats (assistant turns already the target's own: ``peagle regenerate`` output) are prepared once —
   ``peagle prepare --mask-token-id auto --cache`` — so every trainer gets the same examples, draft vocabulary,
   mask token and bf16 target states (``--prepared/--states`` reuse a preparation).
2. One batch plan: peagle's own loader (`peagle.run.loader.TrainData`, seed 0, one packed row of
   ``--max-length`` tokens per optimizer step) fixes the rows of every step; the token budget ``--tokens`` is
   the first steps whose rows hold that many tokens. peagle trains on it (``peagle train``, its defaults, bf16
   autocast), and with ``--peer speculators`` speculators 0.9.0 trains its ``PEagleDraftModel`` on exactly the
   same rows (`benchmarks/quality_speculators.py` in the peer venv: its sampling, loss, optimizer, schedule
   and defaults; the CPU adaptations it needs are listed there and in the output).
3. Equal time: both rates (training tokens per second of step time) are measured in the equal-token runs;
   the faster trainer is trained again for the tokens it gets in the slower one's time.
4. Every draft (and ``--curve`` intermediate checkpoints of the equal-token runs) is exported in the
   speculators format and served by the real vLLM (``.venv-vllm``: `peagle.target.vllm_engine.served_counters`,
   fp32, greedy, every held-out prompt in one batch per K'); vLLM's own per-request rounds give each held-out
   file's AL for K' = 1..K and its per-position acceptance.
5. ``--ablate NAME=key=value,...`` adds peagle runs at the equal-token budget with config overrides (one
   table row each, scored at K' = K).

Writes ``--json`` (``{"runs": [...], ...}``), a markdown report beside it (``.md``) and a plot of AL against
training tokens (``.png``). Times are this machine's; the report prints its measured matmul rate and load.
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

REPO = Path(__file__).resolve().parents[1]
FULL = {"max_length": 1024, "heldout_limit": 12, "max_new_tokens": 128, "curve": 3}
QUICK = {"max_length": 128, "heldout_limit": 4, "max_new_tokens": 16, "curve": 2}


# ------------------------------------------------------------------------------------------------ scoring
def score_main(spec_path: str, out_path: str) -> None:
    """(runs in the vLLM venv) vLLM's counters for every draft of the spec, split per held-out file."""
    from transformers import AutoTokenizer

    from peagle.eval.prompts import load_prompts, stop_token_ids_of, tokenize_prompts
    from peagle.target.vllm_engine import served_counters

    spec = json.loads(Path(spec_path).read_text())
    tok = AutoTokenizer.from_pretrained(spec["target"])
    prompts, owner = [], []
    for name, path in spec["heldout"].items():
        recs = load_prompts(path)[: spec["limit"]]
        prompts += tokenize_prompts(tok, recs)
        owner += [name] * len(recs)
    stops = stop_token_ids_of(spec["target"], tok)
    longest = max(len(p) for p in prompts) + spec["max_new_tokens"]
    results = {}
    for label, entry in spec["drafts"].items():
        t0 = time.perf_counter()
        served = served_counters(spec["target"], entry["dir"], prompts, [spec["max_new_tokens"]] * len(prompts),
                                 stops, entry["k_values"], max_model_len=longest + 4 * (spec["k"] + 1) + 64)
        results[label] = {str(k): per_file(res, owner, k) for k, res in served.items()}
        print(f"scored {label} at K' {entry['k_values']} in {time.perf_counter() - t0:.0f}s", flush=True)
    Path(out_path).write_text(json.dumps(results))


def per_file(res: dict[str, Any], owner: list[str], k: int) -> dict[str, Any]:
    """One engine's counters split by held-out file from its per-request rounds (checked against the totals)."""
    rounds_all = [r for rr in res["rounds"] for r in rr]
    if len(rounds_all) != res["num_drafts"] or sum(rounds_all) != res["num_accepted_tokens"]:
        raise SystemExit(f"quality.py: vLLM's per-request rounds ({len(rounds_all)} drafts, {sum(rounds_all)} "
                         f"accepted) do not sum to its counters ({res['num_drafts']}, {res['num_accepted_tokens']})")
    out: dict[str, Any] = {}
    for name in dict.fromkeys(owner):
        rounds = [r for rr, o in zip(res["rounds"], owner, strict=True) if o == name for r in rr]
        n = len(rounds)
        out[name] = {"num_drafts": n, "num_accepted_tokens": sum(rounds),
                     "acceptance_length": 1 + sum(rounds) / max(n, 1),
                     "per_position": [sum(r >= p for r in rounds) / max(n, 1) for p in range(1, k + 1)]}
    return out


# ------------------------------------------------------------------------------------------------ helpers
def run(cmd: list[Any], log: Path, env: dict[str, str] | None = None) -> str:
    """Run a stage; its output goes to ``log``; one clear line and exit on failure."""
    cmd = [str(c) for c in cmd]
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
        f.write(proc.stdout)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        sys.exit(f"quality.py: the {log.stem} stage failed (exit {proc.returncode}); "
                 f"see {log}: {' | '.join(tail)}")
    return proc.stdout


def peagle_cmd() -> list[str]:
    return [sys.executable, "-m", "peagle.cli"]


def prepare(args, work: Path) -> tuple[Path, Path]:
    """``peagle prepare --cache`` once (vLLM's extraction when the vLLM venv exists, else the HF target)."""
    if args.prepared:
        return Path(args.prepared), Path(args.states)
    prepared, states = work / "prepared", work / "states"
    if (states / "cache_manifest.json").exists():
        return prepared, states
    vllm_peagle = Path(args.vllm_python).parent / "peagle"
    cmd = [*([vllm_peagle] if vllm_peagle.exists() else peagle_cmd()), "prepare", args.chats, "--target",
           args.target, "--out", prepared, "--max-length", args.max_length, "--draft-vocab-size",
           args.draft_vocab_size, "--mask-token-id", "auto", "--cache", states, "--cache-shard-size", 16,
           "--no-progress", *(["--engine", "vllm"] if vllm_peagle.exists() else [])]
    run(cmd, work / "prepare.log")
    return prepared, states


def train_config(args, prepared: Path, states: Path, out: Path, steps: int, save_every: int,
                 overrides: dict[str, Any]) -> dict[str, Any]:
    """peagle's training config: its defaults, the shared shape and plan (one row per step), no evaluation."""
    cfg: dict[str, Any] = {
        "data": {"dataset": str(prepared), "cache": str(states), "max_length": args.max_length,
                 "val_fraction": 0.0},
        "model": {"target": args.target, "num_layers": args.layers, "num_depths": args.k},
        "optim": {},
        "train": {"output_dir": str(out), "micro_batch_size": 1, "grad_accum": 1, "max_steps": steps, "seed": 0,
                  "save_every": save_every, "keep_last": 1000, "eval_every": 0, "log_every": 1, "device": "cpu",
                  "tensorboard": False, "progress": False, "dtype": "bf16"},
        "eval": {"enabled": False},
    }
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        cfg[section][name] = value
    return cfg


def plan(args, prepared: Path, states: Path, work: Path, max_steps: int) -> tuple[list[list[int]], list[int]]:
    """Rows (example indices) of the first ``max_steps`` steps as peagle's loader takes them, and their token
    counts; writes ``plan.pt`` for the peer (rows, the examples' ids and loss masks, vocabulary, shape)."""
    import torch

    from peagle.config.training import config_from_dict
    from peagle.data.prepared import load_prepared
    from peagle.run.loader import TrainData
    from peagle.store.checkpoint import TrainState

    cfg = config_from_dict(train_config(args, prepared, states, work / "unused", max_steps, 0, {}))
    data = load_prepared(prepared)
    loader = TrainData(cfg, data, rows_per_step=1)
    rows = [loader.epoch_rows(e)[r] for e, r in loader.positions(TrainState(), max_steps)]
    tokens = [sum(data.lengths[i] for i in row) for row in rows]
    vocab, choice = data.draft_vocab(), data.draft_choice
    cache = json.loads((states / "cache_manifest.json").read_text())
    used = sorted({i for row in rows for i in row})
    torch.save({"target": args.target, "cache": str(states), "steps": rows, "max_length": args.max_length,
                "examples": {i: (data[i]["input_ids"], data[i]["loss_mask"]) for i in used},
                "d2t": vocab.d2t, "t2d": vocab.t2d, "mask_token_id": int(choice["mask_token_id"]),
                "aux_layer_ids": list(cache["aux_layer_ids"]), "num_depths": args.k, "num_layers": args.layers},
               work / "plan.pt")
    return rows, tokens


def steps_for(tokens: list[int], budget: float, *, within: bool = False) -> int:
    """The fewest plan steps whose rows hold at least ``budget`` tokens; ``within``: the most steps whose rows
    hold at most ``budget`` (an equal-time run never gets more time than the slower trainer took)."""
    total = 0
    for s, t in enumerate(tokens, 1):
        total += t
        if total >= budget:
            return s - 1 if within and total > budget and s > 1 else s
    sys.exit(f"quality.py: the plan holds {total} tokens, fewer than the budget {budget:.0f}; raise --max-plan-epochs")


def train_peagle(args, prepared: Path, states: Path, out: Path, steps: int, curve: list[int],
                 overrides: dict[str, Any]) -> dict[str, Any]:
    """``peagle train`` + ``peagle export`` (final and curve steps); step time summed from its metrics."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    save_every = curve[0] if curve else 0  # the curve's steps are multiples of its first (see main)
    cfg = train_config(args, prepared, states, out / "run", steps, save_every, overrides)
    (out / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    run([*peagle_cmd(), "train", out / "train.yaml"], out / "train.log")
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
               if '"step_s"' in line]
    step_s = [m["step_s"] for m in metrics]
    tok = [m["tokens"] for m in metrics]
    saved = {}
    for s in sorted({*curve, steps}):
        ckpt = out / "run" / f"step-{s:08d}"
        export = out / f"export-{s:06d}"
        if not export.exists():
            run([*peagle_cmd(), "export", ckpt, export], out / "export.log")
        saved[s] = {"dir": str(export), "train_tokens": sum(tok[:s]), "train_s": sum(step_s[:s])}
    return {"trainer": "peagle", "steps": steps, "losses": [m["loss"] for m in metrics], "train_s": sum(step_s),
            "train_tokens": sum(tok), "wall_s": wall, "saved": saved, "overrides": overrides}


def train_peer(args, python: Path, work: Path, out: Path, steps: int, curve: list[int]) -> dict[str, Any]:
    """speculators' trainer on the same plan (the peer venv, `quality_speculators.py`)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stdout = run([python, REPO / "benchmarks" / "quality_speculators.py", "--plan", work / "plan.pt", "--out", out,
                  "--steps", steps, "--save-at", *curve], out / "train.log")
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT_JSON "))
    res = json.loads(line[len("RESULT_JSON "):])
    res["wall_s"] = time.perf_counter() - t0
    res["saved"] = {int(k): v for k, v in res["saved"].items()}
    return res


def peer_python(args) -> Path:
    python = Path(args.peer_python or Path.home() / ".cache" / "peagle-peer-bench" / "venv" / "bin" / "python")
    if not python.exists():
        bench = Path(args.peer_bench or REPO.parent / "shared" / "peer-bench")
        sys.exit(f"quality.py: no peer venv python at {python}: run `bash {bench / 'setup_venv.sh'}` first "
                 "(or pass --peer-python)")
    return python


def parse_ablation(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=section.key=value,section.key=value`` → (NAME, overrides); values parsed as YAML."""
    import yaml

    name, _, rest = text.partition("=")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            sys.exit(f"quality.py: --ablate {text!r}: expected NAME=section.key=value[,section.key=value]")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 3e-3 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        overrides[key] = parsed
    return name, overrides


# ------------------------------------------------------------------------------------------------ report
def write_report(result: dict[str, Any], out: Path) -> None:
    """The markdown tables (equal tokens, equal time, ablations) and the AL-vs-tokens plot."""
    from peagle.util.plots import plot_lines

    k = str(result["k"])
    runs = result["runs"]
    kinds = list(dict.fromkeys(r["heldout"] for r in runs))
    lines = [f"# Draft quality: peagle vs speculators ({result['when']})", "",
             f"Machine: {result['machine']}. Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min).",
             f"Shape: {result['layers']}-layer draft, K = {k}, draft vocabulary {result['draft_vocab_size']}, rows "
             f"of {result['max_length']} tokens, one row per step. AL by the real vLLM's counters (fp32, greedy, "
             f"{result['heldout_limit']} prompts per held-out file, {result['max_new_tokens']} new tokens).", ""]
    for budget in ("tokens", "time"):
        rows = [r for r in runs if r["budget"] == budget and not r.get("ablation")]
        if not rows:
            continue
        lines += [f"## Equal {'training tokens' if budget == 'tokens' else 'wall-clock (step time)'}", "",
                  "| trainer | held-out | AL@K'=1..K | per-position acceptance | train tokens | train s | tok/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            al = " / ".join(f"{r['acceptance_length'][str(j)]:.3f}" for j in range(1, int(k) + 1)
                            if str(j) in r["acceptance_length"])
            pp = " ".join(f"{p:.2f}" for p in r["per_position"])
            lines.append(f"| {r['trainer']} | {r['heldout']} | {al} | {pp} | {r['train_tokens']} | "
                         f"{r['train_s']:.0f} | {r['train_tokens'] / max(r['train_s'], 1e-9):.0f} |")
        mean = {t: sum(r["acceptance_length"][k] for r in rows if r["trainer"] == t) / len(kinds)
                for t in dict.fromkeys(r["trainer"] for r in rows)}
        lines += ["", "Mean AL@K over the held-out files: " + ", ".join(f"{t} {v:.3f}" for t, v in mean.items()),
                  ""]
    abl = [r for r in runs if r.get("ablation")]
    if abl:
        lines += ["## Ablations (peagle, equal tokens, AL at K by vLLM)", "",
                  "| variant | overrides | " + " | ".join(kinds) + " | mean |", "|---|---|" + "---|" * (len(kinds) + 1)]
        for name in dict.fromkeys(r["ablation"] for r in abl):
            rs = {r["heldout"]: r["acceptance_length"][k] for r in abl if r["ablation"] == name}
            ov = next(r["overrides"] for r in abl if r["ablation"] == name)
            lines.append(f"| {name} | {', '.join(f'{a}={b}' for a, b in ov.items()) or 'defaults'} | "
                         + " | ".join(f"{rs[h]:.3f}" for h in kinds) + f" | {sum(rs.values()) / len(rs):.3f} |")
        lines.append("")
    curve = result.get("curve", {})
    if curve:
        series, xs = {}, sorted({x for c in curve.values() for x, _ in c})
        for name, pts in curve.items():
            d = dict(pts)
            series[name] = [d.get(x) for x in xs]
        png = plot_lines(out.with_suffix(".png"), xs, series, xlabel="training tokens",
                         ylabel=f"mean AL at K={k} (vLLM)", title="AL vs training tokens")
        lines += [f"![AL vs training tokens]({png.name})", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score_main(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="Hugging Face target directory")
    p.add_argument("--chats", help="chats whose assistant turns are the target's own (peagle regenerate output)")
    p.add_argument("--heldout", nargs="+", required=True, action="extend", help="held-out prompt files (JSONL)")
    p.add_argument("--tokens", type=float, required=True, help="training-token budget of the equal-token runs")
    p.add_argument("--peer", choices=("speculators",), default=None)
    p.add_argument("--peer-bench", default=None, help="../shared/peer-bench (its setup_venv.sh builds the venv)")
    p.add_argument("--peer-python", default=None, help="default ~/.cache/peagle-peer-bench/venv/bin/python")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--json", required=True)
    p.add_argument("--work", default=None, help="working folder (default: beside --json)")
    p.add_argument("--prepared", default=None, help="reuse a `peagle prepare` output ...")
    p.add_argument("--states", default=None, help="... and its `--cache` states")
    p.add_argument("--draft-vocab-size", type=int, default=16384)
    p.add_argument("--max-length", type=int, default=None, help=f"row length (default {FULL['max_length']})")
    p.add_argument("--heldout-limit", type=int, default=None,
                   help=f"prompts per held-out file (default {FULL['heldout_limit']})")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"default {FULL['max_new_tokens']}")
    p.add_argument("--curve", type=int, default=None,
                   help=f"points of the AL-vs-tokens curve per equal-token run (default {FULL['curve']})")
    p.add_argument("--quick", action="store_true",
                   help=f"a minutes-long run through every stage (the vLLM suite's): {QUICK} unless given")
    p.add_argument("--no-equal-time", action="store_true")
    p.add_argument("--ablate", action="append", default=[], help="NAME=section.key=value,... (peagle only)")
    p.add_argument("--set", action="append", default=[], dest="peagle_set",
                   help="section.key=value applied to every peagle run (e.g. the defaults under test)")
    p.add_argument("--max-plan-epochs", type=int, default=4)
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.prepared and not args.chats:
        p.error("--chats is required unless --prepared/--states are given")
    if bool(args.prepared) != bool(args.states):
        p.error("--prepared and --states go together")
    for f in args.heldout:
        if not Path(f).is_file():
            p.error(f"--heldout {f}: no such file")
    python = peer_python(args) if args.peer else None
    t_start = time.perf_counter()
    out_json = Path(args.json).resolve()
    work = Path(args.work or out_json.with_suffix("")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _, base = parse_ablation("base=" + ",".join(args.peagle_set))

    from peagle.util.machine import matmul_rate

    machine = (f"{os.cpu_count()} cores, {matmul_rate(0.5) / 1e9:.0f} GFLOP/s fp32 matmul, "
               f"load {os.getloadavg()[0]:.1f} at the start")
    prepared, states = prepare(args, work)
    from peagle.data.prepared import load_prepared

    row_tokens = sum(load_prepared(prepared).lengths)
    max_steps = int(args.max_plan_epochs * row_tokens / args.max_length * 1.2) + 10
    rows, tokens = plan(args, prepared, states, work, max_steps)
    steps = steps_for(tokens, args.tokens)
    every = max(1, steps // args.curve)  # peagle checkpoints every N steps: the curve takes multiples of N
    curve = [every * (j + 1) for j in range(args.curve - 1) if every * (j + 1) < steps]
    print(f"plan: {steps} steps hold {sum(tokens[:steps])} tokens (budget {args.tokens:.0f}); curve at {curve}",
          flush=True)

    trained: dict[str, dict[str, Any]] = {}
    trained["peagle/tokens"] = train_peagle(args, prepared, states, work / "peagle-tokens", steps, curve, base)
    if args.peer:
        trained["speculators/tokens"] = train_peer(args, python, work, work / "speculators-tokens", steps, curve)
        if not args.no_equal_time:
            rate = {t: trained[f"{t}/tokens"]["train_tokens"] / trained[f"{t}/tokens"]["train_s"]
                    for t in ("peagle", "speculators")}
            fast, slow = sorted(rate, key=rate.get, reverse=True)
            budget = rate[fast] * trained[f"{slow}/tokens"]["train_s"]
            s2 = steps_for(tokens, budget, within=True)
            print(f"equal time: {fast} {rate[fast]:.0f} tok/s vs {slow} {rate[slow]:.0f}: {fast} gets {s2} steps "
                  f"({budget:.0f} tokens) in {slow}'s {trained[f'{slow}/tokens']['train_s']:.0f} s", flush=True)
            trained[f"{slow}/time"] = trained[f"{slow}/tokens"]
            trained[f"{fast}/time"] = (train_peagle(args, prepared, states, work / "peagle-time", s2, [], base)
                                       if fast == "peagle" else
                                       train_peer(args, python, work, work / "speculators-time", s2, []))
    for spec in args.ablate:
        name, overrides = parse_ablation(spec)
        trained[f"ablation:{name}"] = train_peagle(args, prepared, states, work / f"ablation-{name}", steps, [],
                                                   {**base, **overrides})

    # score every draft with vLLM's counters
    drafts: dict[str, dict[str, Any]] = {}
    for label, res in trained.items():
        final = res["saved"][res["steps"]]["dir"]
        full = not label.startswith("ablation:")
        drafts[label] = {"dir": final, "k_values": list(range(1, args.k + 1)) if full else [args.k]}
        if label.endswith("/tokens"):
            for s in curve:
                drafts[f"{label}@{s}"] = {"dir": res["saved"][s]["dir"], "k_values": [args.k]}
    unique = {}
    for label, d in drafts.items():  # the equal-time run of the slower trainer is its equal-token run
        unique.setdefault(d["dir"] + str(d["k_values"]), (label, d))
    heldout = {Path(f).stem: str(Path(f).resolve()) for f in args.heldout}
    spec = {"target": args.target, "heldout": heldout, "limit": args.heldout_limit, "k": args.k,
            "max_new_tokens": args.max_new_tokens, "drafts": {lab: d for lab, d in unique.values()}}
    (work / "score_spec.json").write_text(json.dumps(spec, indent=1))
    run([args.vllm_python, Path(__file__).resolve(), "score", work / "score_spec.json", work / "scores.json"],
        work / "score.log", env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")})
    scores = json.loads((work / "scores.json").read_text())
    by_dir = {d["dir"] + str(d["k_values"]): scores[lab] for lab, d in unique.values()}

    runs, curves = [], {}
    for label, res in trained.items():
        if "@" in label:
            continue
        sc = by_dir[drafts[label]["dir"] + str(drafts[label]["k_values"])]
        trainer, _, budget = label.partition("/")
        for name in heldout:
            last = sc[str(args.k)][name]
            run_row = {"trainer": "peagle" if label.startswith("ablation:") else trainer,
                       "budget": "tokens" if label.startswith("ablation:") else budget, "heldout": name,
                       "acceptance_length": {kk: v[name]["acceptance_length"] for kk, v in sc.items()},
                       "per_position": last["per_position"], "num_drafts": last["num_drafts"],
                       "num_accepted_tokens": last["num_accepted_tokens"], "train_tokens": res["train_tokens"],
                       "train_s": res["train_s"], "steps": res["steps"]}
            if label.startswith("ablation:"):
                run_row.update(ablation=label.split(":", 1)[1], overrides=res["overrides"])
            runs.append(run_row)
        if label.endswith("/tokens"):
            pts = []
            for s in [*curve, res["steps"]]:
                key = (res["saved"][s]["dir"] + str([args.k]) if s != res["steps"]
                       else drafts[label]["dir"] + str(drafts[label]["k_values"]))
                al = by_dir[key][str(args.k)]
                pts.append((res["saved"][s]["train_tokens"],
                            sum(al[n]["acceptance_length"] for n in heldout) / len(heldout)))
            curves[trainer] = pts
    result = {"runs": runs, "curve": curves, "k": args.k, "layers": args.layers,
              "draft_vocab_size": args.draft_vocab_size, "max_length": args.max_length,
              "heldout_limit": args.heldout_limit, "max_new_tokens": args.max_new_tokens, "machine": machine,
              "when": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - t_start,
              "command": "python benchmarks/quality.py " + " ".join(argv),
              "trainers": {label: {k: v for k, v in res.items() if k not in ("losses",)}
                           for label, res in trained.items()}}
    out_json.write_text(json.dumps(result, indent=1))
    write_report(result, out_json)
    print(out_json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
