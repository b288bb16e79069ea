"""What a demo run reports: ``report.md`` (one small function per section), ``summary.json``, the
closing terminal lines; from the :class:`DemoResults` ``peagle.demo.run`` gathers (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peagle.demo.settings import DemoSettings, DraftSettings
from peagle.model.draft import PEagleDraft
from peagle.util import plots

if TYPE_CHECKING:
    from peagle.eval.report import EvalResult

__all__ = ["DemoResults", "DraftStats", "PipelineResults", "acceptance_section", "al_table",
           "draft_and_training_section", "draft_stats", "environment_section", "fmt", "log_outcome", "plots_section",
           "prepare_command", "report_plots", "summary_of", "timings_section", "write_report", "write_summary"]

_PLOT_TITLES = {"loss": "training loss", "depth_accuracy": "top-1 agreement per depth",
                "al_during_training": "AL during training", "per_position": "per-position acceptance",
                "al_vs_k": "AL vs K", "al_histogram": "AL per prompt"}
_FILES = [  # the report's "Files" section: what the demo writes into its output folder
    "## Files\n",
    "- `eval.json`: the `peagle eval --json` output (AL for every K', per-position rates, per prompt)",
    "- `draft/`: the exported speculators-format draft (config.json + model.safetensors)",
    "- `train.yaml`: the training config; `run/`: checkpoint, metrics.jsonl; `prepared/`: the tokenized data",
    "- `data/train_chats.jsonl`: the regenerated chats; `data/heldout.jsonl`: held-out prompts + answers\n",
]


@dataclasses.dataclass(frozen=True)
class PipelineResults:
    """What every demo run produced that its report describes (the draft, its training and evaluation)."""

    out: Path
    settings: DraftSettings
    ev: EvalResult
    train_log: list[dict]
    val_log: list[dict]
    target_dir: Path
    draft_choice: dict  # the draft vocab + mask token `peagle prepare` recorded
    num_chats: int
    checkpoint: Path | None
    stage_seconds: dict[str, float]
    t_start: float  # perf_counter() at the start of the run
    quick: bool  # the run used the ``--quick`` settings (shown in the reproduce command)
    al_bar: float | None  # the mean AL the run must reach at ``bar_k`` (None: no bar)
    bar_k: int
    matmul_gflops: float  # this machine's measured fp32 matmul rate (times are quoted beside it)


@dataclasses.dataclass(frozen=True)
class DemoResults(PipelineResults):
    """Everything one embedded-demo run produced that the report describes."""

    settings: DemoSettings
    target_marker: dict  # the cached target's marker (sizes, parameters, training time)
    target_cached: bool  # the target was in the cache before this run
    eval_records: list[dict]  # the held-out corpus records (prompt + reference answer)


@dataclasses.dataclass(frozen=True)
class _TaskScores:
    """Per task: the target's exact-match hits and the per-prompt ALs of the evaluated prompts."""

    hits: dict[str, list[bool]]
    al: dict[str, list[float]]
    all_hits: list[bool]
    accuracy: float  # over all tasks


@dataclasses.dataclass(frozen=True)
class DraftStats:
    """Size of the exported draft and throughput of its training."""

    draft: PEagleDraft
    num_parameters: int
    num_trainable: int  # without embed_tokens
    step_s: float  # seconds spent in optimizer steps
    tokens: int
    tokens_per_s: float


def fmt(v: float | None, spec: str = ".3f") -> str:
    """``v`` formatted with ``spec``, or ``n/a`` when missing or not finite."""
    return "n/a" if v is None or not math.isfinite(float(v)) else format(float(v), spec)


def _q(p: Path | str | None) -> str:
    return shlex.quote(str(p))


def prepare_command(out: Path, target_dir: Path, s: DraftSettings) -> list[str]:
    """The ``peagle prepare`` arguments equivalent to the demo's prepare stage."""
    args = ["prepare", str(out / "data" / "train_chats.jsonl"), "--target", str(target_dir),
            "--out", str(out / "prepared"), "--max-length", str(s.max_length)]
    if s.draft_vocab_size is not None:
        args += ["--draft-vocab-size", str(s.draft_vocab_size)]
    return args


def _task_scores(ev: EvalResult, eval_records: list[dict]) -> _TaskScores:
    """Exact match of the evaluated greedy completions vs the corpus answers, and AL, per task."""
    hits: dict[str, list[bool]] = {}
    al: dict[str, list[float]] = {}
    for p in ev.prompts:
        rec = eval_records[p["index"]]
        task = rec.get("task", "?")
        hits.setdefault(task, []).append(p.get("completion") == rec["messages"][-1]["content"])
        if p["acceptance_length"] is not None and math.isfinite(p["acceptance_length"]):
            al.setdefault(task, []).append(p["acceptance_length"])
    all_hits = [h for v in hits.values() for h in v]
    return _TaskScores(hits, al, all_hits, sum(all_hits) / max(1, len(all_hits)))


def draft_stats(out: Path, train_log: list[dict]) -> DraftStats:
    """Load the exported draft back and sum the training log."""
    draft = PEagleDraft.from_pretrained(out / "draft")
    n_params = sum(p.numel() for p in draft.parameters())
    step_s = sum(r["step_s"] for r in train_log)
    tokens = sum(r["tokens"] for r in train_log)
    return DraftStats(draft, n_params, n_params - draft.embed_tokens.weight.numel(), step_s, tokens,
                       tokens / step_s if step_s else float("nan"))


# ------------------------------------------------------------------------------------------------
# the sections (each a list of report.md lines)


def _header(r: DemoResults) -> list[str]:
    k, ev = r.settings.num_depths, r.ev
    al_bar = ev.acceptance_length.get(r.bar_k, float("nan"))
    verdict = "." if r.al_bar is None else f" (bar: ≥ {r.al_bar} — {'met' if al_bar >= r.al_bar else 'NOT met'})."
    return [
        "# peagle demo report\n",
        f"A P-EAGLE draft (K = {k}) trained end to end on this CPU for a tiny Llama target, with the same "
        "`prepare → train → eval → export` a user runs on a real model. Acceptance is measured exactly, "
        "offline, with vLLM's greedy parallel-drafting semantics (`peagle eval`).\n",
        f"**Mean acceptance length at K = {r.bar_k}: {fmt(al_bar)}** on {len(ev.prompts)} held-out prompts"
        + verdict + "\n",
    ]


def acceptance_section(ev: EvalResult,
                       title: str = "Acceptance (held-out prompts, exact offline, vLLM greedy semantics)") -> list[str]:
    """AL per K' (with vLLM's own counters beside it when ``ev.vllm`` holds them) and per-position acceptance."""
    k, per_pos, served = ev.num_speculative_tokens, list(ev.per_position), (ev.vllm or {}).get("by_k", {})
    vllm_head, vllm_rule = (" vLLM drafts | vLLM accepted | vLLM AL | agrees |", "---:|---:|---:|---|") if served \
        else ("", "")
    al_head = "predicted AL (offline, vLLM's rules)" if served else "mean AL (vLLM's counters)"
    lines = [f"## {title}\n",
             f"| K' (served) | {al_head} | useful AL | draft acceptance rate | drafts "
             "| accepted tokens |" + vllm_head,
             "|---:|---:|---:|---:|---:|---:|" + vllm_rule]
    for kk, m in ev.by_k.items():
        row = (f"| {kk} | {fmt(m['acceptance_length'])} | {fmt(ev.useful_by_k[kk]['acceptance_length'])} "
               f"| {fmt(m['draft_acceptance_rate'])} | {m['num_drafts']} | {m['num_accepted_tokens']} |")
        if served:
            v = served.get(str(kk), {})
            row += (f" {v.get('num_drafts', 'n/a')} | {v.get('num_accepted_tokens', 'n/a')} "
                    f"| {fmt(v.get('acceptance_length'))} | {'yes' if v.get('agrees') else 'no'} |")
        lines.append(row)
    lines += [
        "",
        "Mean AL is what vLLM's own spec-decode counters report when it serves `draft/` (in a request's last "
        "round vLLM also counts drafts its verifier accepted past the stop token); useful AL counts only the "
        "accepted tokens inside the outputs (see the project's docs/evaluation.md).\n",
        f"Per-position acceptance at K = {k} (cumulative: position i = fraction of drafts whose first i "
        "tokens were all accepted; AL = 1 + their sum):\n",
        "| " + " | ".join(f"pos {i + 1}" for i in range(len(per_pos))) + " |",
        "|" + "---:|" * len(per_pos),
        "| " + " | ".join(fmt(v) for v in per_pos) + " |\n",
    ]
    if served.get(str(k)):
        v = served[str(k)]
        lines.append(f"vLLM's accepted tokens per position at K = {k}: {v['accepted_per_position']} (offline "
                     f"prediction {v['offline']['accepted_per_position']}); vLLM's outputs equal to the offline "
                     f"continuations: {v['outputs_equal_offline']} of {len(ev.prompts)}.\n")
    return lines


def _acceptance(r: DemoResults, scores: _TaskScores) -> list[str]:
    """The results tables: AL per K', per-position acceptance at K, AL and target accuracy per task."""
    lines = [
        *acceptance_section(r.ev),
        f"Per task (mean of per-prompt AL at K = {r.settings.num_depths}, and the target's exact-match accuracy):\n",
        "| task | prompts | mean AL | target exact match |",
        "|---|---:|---:|---:|",
    ]
    for task in sorted(scores.hits):
        a, hits = scores.al.get(task, []), scores.hits[task]
        lines.append(f"| {task} | {len(hits)} | {fmt(sum(a) / len(a) if a else None, '.2f')} "
                     f"| {sum(hits) / len(hits):.0%} |")
    return [*lines, ""]


def _target(r: DemoResults, scores: _TaskScores) -> list[str]:
    ts, marker, hits = r.settings.target, r.target_marker, scores.all_hits
    return [
        "## Target\n",
        f"- tiny Llama: {ts.num_layers} layers, hidden {ts.hidden_size}, {ts.num_heads} heads "
        f"({ts.num_kv_heads} KV), vocab {marker.get('vocab_size', '?')}, "
        f"{marker.get('num_parameters', 0) / 1e6:.2f}M parameters; BPE tokenizer + chat template trained "
        "on the synthetic corpus (`peagle.demo.corpus`, seed "
        f"{ts.seed}: {ts.num_train} training chats, {ts.num_heldout} held-out prompts never seen in training)",
        f"- training: {ts.steps} steps × {ts.batch_size} chats, {marker.get('train_seconds', '?')}s "
        + ("(cached from an earlier run: not retrained)" if r.target_cached else "(trained by this run)"),
        f"- **held-out exact match: {scores.accuracy:.1%}** ({sum(hits)}/{len(hits)} greedy answers equal "
        "to the corpus answer); the draft imitates the target's own answers, right or wrong\n",
    ]


def draft_and_training_section(r: PipelineResults, d: DraftStats, extra: Sequence[str] = ()) -> list[str]:
    """The draft, its data and training (``extra``: more bullet lines), AL measured during training."""
    s, k, choice, dcfg = r.settings, r.settings.num_depths, r.draft_choice, d.draft.config
    lines = [
        "## Draft and training\n",
        f"- P-EAGLE draft: {dcfg.num_hidden_layers} decoder layer(s) (the first one the fused 2H EAGLE-3 layer), "
        f"hidden {dcfg.hidden_size}, K = {k} parallel depths, draft vocab {choice['draft_vocab_size']} of "
        f"{choice['vocab_size']} ({choice['coverage']:.2%} of supervised tokens), mask token id "
        f"{choice['mask_token_id']}; {d.num_parameters / 1e6:.3f}M parameters ({d.num_trainable / 1e6:.3f}M "
        "without embed_tokens); lm_head initialised from the target's rows of the draft vocab "
        "(`init_lm_head_from_target`)",
        f"- data: {r.num_chats} training chats whose responses were regenerated by the target (greedy), "
        f"packed into rows of {s.max_length} tokens; {s.val_fraction:.0%} held out for validation loss",
        f"- {len(r.train_log)} steps × {s.micro_batch_size} rows, lr {s.lr:g} (warmup {s.warmup_steps}, cosine), "
        f"COD r = 0.7, r_min = 0.2; AL on {s.num_al_prompts} held-out prompts every {s.eval_every} steps",
        f"- **training time {d.step_s:.0f}s** in optimizer steps ({r.stage_seconds.get('train', 0):.0f}s for the "
        f"whole `train` stage, with validation and AL evaluation); **{d.tokens_per_s:,.0f} tokens/s** "
        f"({d.tokens:,} tokens) on {torch.get_num_threads()} CPU threads",
    ]
    if r.train_log:
        last = r.train_log[-1]
        accs = ", ".join(f"d{i} {fmt(last.get(f'acc_{i}'), '.2f')}" for i in range(k))
        lines.append(f"- last step: loss {fmt(last.get('loss'))}, top-1 agreement per depth {accs}")
    lines += extra
    if r.val_log:
        lines += ["\nAcceptance length on held-out prompts during training:\n",
                  "| step | " + " | ".join(f"AL K={kk}" for kk in range(1, k + 1)) + " | val loss |",
                  "|---:|" + "---:|" * (k + 1)]
        lines += [f"| {v['step']} | " + " | ".join(fmt(v.get(f"al_k{kk}")) for kk in range(1, k + 1))
                  + f" | {fmt(v.get('loss'))} |" for v in r.val_log]
    return [*lines, ""]


def timings_section(r: PipelineResults) -> list[str]:
    """Wall time per stage so far; the total is taken now, so it excludes the report stage."""
    lines = ["## Time per stage\n", f"On this machine: {r.matmul_gflops:.0f} GFLOP/s measured fp32 matmul rate, "
             f"{os.cpu_count()} cores (times on another CPU scale roughly with that rate).\n",
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in r.stage_seconds.items()]
    lines.append(f"| **total (report excluded)** | {time.perf_counter() - r.t_start:.1f} |\n")
    return lines


def plots_section(out: Path, plot_files: dict[str, Any]) -> list[str]:
    lines = ["## Plots\n"]
    lines += [f"![{_PLOT_TITLES.get(name, name)}]({Path(path).relative_to(out)})" for name, path in plot_files.items()]
    return [*lines, ""]


def _reproduce(r: DemoResults) -> list[str]:
    """The commands that rerun the demo, whole or stage by stage, and serve its draft with vLLM."""
    out, s, target = r.out, r.settings, _q(r.target_dir)
    heldout = _q(out / "data" / "heldout.jsonl")
    return [
        "## Reproduce\n",
        "```bash",
        f"peagle demo --out {_q(out)}" + (" --quick" if r.quick else "") + "   # everything below",
        "# or stage by stage, on the data this run wrote:",
        f"peagle {' '.join(map(_q, prepare_command(out, r.target_dir, s)))}",
        f"rm -rf {_q(out / 'run')}; peagle train {_q(out / 'train.yaml')}",
        f"peagle eval --target {target} --draft {_q(out / 'run' / 'final')} "
        f"--prompts {heldout} --max-new-tokens {s.max_new_tokens} "
        f"--out {_q(out / 'plots')} --json {_q(out / 'eval.json')}",
        f"peagle export {_q(r.checkpoint)} {_q(out / 'draft')} --overwrite",
        "```\n",
        "## Serving this draft with vLLM\n",
        "`draft/` loads unchanged in vLLM (its config records the target's path, `target` links to it). "
        "The numbers above are what vLLM's own counters report; to check them against the real engine "
        "(vLLM installed, e.g. the `.venv-vllm` that `make test-vllm` builds):\n",
        "```bash",
        f"peagle eval --target {target} --draft {_q(out / 'draft')} "
        f"--prompts {heldout} --max-new-tokens {s.max_new_tokens} --engine vllm",
        f"python -m vllm.entrypoints.openai.api_server --model {_q(out / 'draft')} --dtype float32 "
        "--host 127.0.0.1 --port 8000 --enforce-eager",
        "```\n",
    ]


def environment_section() -> list[str]:
    return [f"Environment: Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.machine()}, {os.cpu_count()} CPU cores."]


# ------------------------------------------------------------------------------------------------
# the outputs


def report_plots(r: PipelineResults) -> dict[str, Any]:
    """The evaluation's PNGs and the training plots (written now into ``out/plots``), by name."""
    plot_files = {name: path for name, path in r.ev.files.items() if name != "json"}
    plot_files.update(plots.training_plots(r.train_log, r.val_log, r.settings.num_depths, r.out / "plots"))
    return plot_files


def summary_of(r: PipelineResults, stats: DraftStats, plot_files: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The run's summary dict (``summary.json`` less the timings); ``extra`` keys go after the AL figures."""
    out = r.out
    return {
        "report": str(out / "report.md"),
        "eval_json": str(out / "eval.json"),
        "draft": str(out / "draft"),
        "num_speculative_tokens": r.settings.num_depths,
        "matmul_gflops": round(r.matmul_gflops, 1),
        "acceptance_length": {str(kk): v for kk, v in r.ev.acceptance_length.items()},
        "per_position": list(r.ev.per_position),
        "num_drafts": r.ev.num_drafts,
        **extra,
        "draft_parameters": stats.num_parameters,
        "train_steps": len(r.train_log),
        "train_step_seconds": round(stats.step_s, 1),
        "train_tokens": stats.tokens,
        "tokens_per_s": stats.tokens_per_s,
        "plots": plot_files,
    }


def write_report(r: DemoResults) -> dict[str, Any]:
    """Write the training plots and ``report.md`` into ``r.out``; return the summary dict (no timings)."""
    out = r.out
    plot_files = report_plots(r)
    scores = _task_scores(r.ev, r.eval_records)
    stats = draft_stats(out, r.train_log)
    lines = [*_header(r), *_acceptance(r, scores), *_target(r, scores), *draft_and_training_section(r, stats),
             *timings_section(r), *plots_section(out, plot_files), *_FILES, *_reproduce(r), *environment_section()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary_of(r, stats, plot_files, target_accuracy=scores.accuracy,
                      target_accuracy_per_task={task: sum(v) / len(v) for task, v in sorted(scores.hits.items())},
                      target_cached=r.target_cached)


def write_summary(out: Path, summary: dict[str, Any], seconds: dict[str, float], t_start: float) -> None:
    """Add the stage timings and the total to ``summary``; write it as ``out/summary.json``."""
    summary["timings_s"] = {k: round(v, 1) for k, v in seconds.items()}
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def al_table(ev: EvalResult) -> str:
    """The terminal AL table: mean AL and draft acceptance per K', per-position rates at K."""
    lines = [f"Acceptance on {len(ev.prompts)} held-out prompts (exact offline, vLLM greedy semantics):",
             f"{'K':>3}  {'mean AL':>8}  {'useful AL':>9}  {'draft acc.':>10}  {'drafts':>7}"]
    for kk, m in ev.by_k.items():
        useful = ev.useful_by_k[kk]["acceptance_length"]
        lines.append(f"{kk:>3}  {fmt(m['acceptance_length']):>8}  {fmt(useful):>9}  "
                     f"{fmt(m['draft_acceptance_rate']):>10}  {m['num_drafts']:>7}")
    lines.append(f"per-position acceptance at K={ev.num_speculative_tokens}: "
                 + "  ".join(f"pos{i + 1} {fmt(v)}" for i, v in enumerate(ev.per_position)))
    return "\n".join(lines)


def log_outcome(out: Path, ev: EvalResult, summary: dict[str, Any], bar_k: int, al_bar: float | None,
                log: Callable[[str], None]) -> None:
    """The closing lines: the AL table, target accuracy, AL at ``bar_k`` (against ``al_bar``), the report path."""
    log("")
    log(al_table(ev))
    al_k = summary["acceptance_length"].get(str(bar_k))
    met = "met" if al_bar is not None and al_k is not None and al_k >= al_bar else "NOT met"
    log(f"\n[demo] target held-out exact match: {summary['target_accuracy']:.1%}; "
        f"mean AL at K={bar_k}: {fmt(al_k)}" + ("" if al_bar is None else f" (bar {al_bar}: {met})"))
    log(f"[demo] total {summary['total_s']:.0f}s; report: {out / 'report.md'}")
