"""What a real-model demo run reports (``peagle demo --real``): ``report.md`` from the shared sections of
``peagle.demo.report`` plus its own (the target, the regenerated data, AL per prompt kind, vLLM's counters,
what more steps would give), ``summary.json``'s content and the closing terminal lines.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peagle.demo.report import (
    DraftStats,
    PipelineResults,
    acceptance_section,
    al_table,
    draft_and_training_section,
    draft_stats,
    environment_section,
    fmt,
    plots_section,
    prepare_command,
    report_plots,
    summary_of,
    timings_section,
)
from peagle.demo.settings import RealSettings

__all__ = ["RealResults", "al_by_kind", "al_growth", "log_real_outcome", "write_real_report"]


@dataclasses.dataclass(frozen=True)
class RealResults(PipelineResults):
    """Everything one real-model demo run produced that its report describes."""

    settings: RealSettings
    target_cached: bool  # the SmolLM2 directory was built before this run
    regen: dict  # engine, records, turns, truncated_turns, tokens
    prep: dict  # mask_token_id, mask_token_reason, examples, tokens, supervised_tokens
    heldout: dict  # held-out prompts per kind
    heldout_kinds: list[str]  # the kind of each prompt of data/heldout.jsonl, in order
    vllm: Path | None  # the vLLM venv's peagle, when vLLM took part
    load_start: float  # the 1-minute load average when the run started
    autocast: str | None  # what train.dtype auto chose


def _q(p: Any) -> str:
    return shlex.quote(str(p))


def _vllm_al(r: RealResults, k: int) -> float | None:
    served = ((r.ev.vllm or {}).get("by_k") or {}).get(str(k))
    return None if not served else served.get("acceptance_length")


def _met(r: RealResults) -> str:
    """'met' / 'NOT met' for the AL aim, judged on vLLM's count (the offline prediction without vLLM)."""
    served, offline = _vllm_al(r, r.bar_k), r.ev.acceptance_length.get(r.bar_k)
    judged = served if served is not None else offline
    return "met" if r.al_bar is not None and judged is not None and judged >= r.al_bar else "NOT met"


def al_by_kind(prompts: Sequence[dict[str, Any]], kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per prompt kind: prompts, the pooled AL (1 + accepted / drafts, vLLM's definition over the kind's
    drafts), the mean of per-prompt ALs and the pooled useful AL, at the evaluation's K."""
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(kinds):
        rows = [p for p in prompts if kinds[p["index"]] == kind]
        drafts = sum(p["num_drafts"] for p in rows)
        accepted = sum(p["num_accepted_tokens"] for p in rows)
        per_prompt = [p["acceptance_length"] for p in rows
                      if p["acceptance_length"] is not None and math.isfinite(p["acceptance_length"])]
        useful_tokens = sum(((p.get("useful_acceptance_length") or 1.0) - 1.0) * p["num_drafts"] for p in rows)
        out[kind] = {"prompts": len(rows), "al": 1 + accepted / drafts if drafts else float("nan"),
                     "mean_prompt_al": sum(per_prompt) / len(per_prompt) if per_prompt else float("nan"),
                     "useful_al": 1 + useful_tokens / drafts if drafts else float("nan")}
    return out


def al_growth(val_log: Sequence[dict[str, Any]], k: int) -> dict[str, Any] | None:
    """AL at K during training, and a log-linear fit AL ≈ a + b·ln(step) over its second half (at least two
    points): the gain per doubling of steps (b·ln 2) and the AL it predicts at 2× and 4× the steps."""
    points = [(int(v["step"]), float(v[f"al_k{k}"])) for v in val_log
              if v.get(f"al_k{k}") is not None and math.isfinite(float(v[f"al_k{k}"])) and int(v["step"]) > 0]
    if len(points) < 2:
        return None
    tail = points[len(points) // 2:] if len(points) >= 4 else points
    xs, ys = [math.log(s) for s, _ in tail], [a for _, a in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    last = points[-1][0]
    return {"points": points, "per_doubling": b * math.log(2), "fit_from": tail[0][0],
            "at_2x": my + b * (math.log(2 * last) - mx), "at_4x": my + b * (math.log(4 * last) - mx)}


# ------------------------------------------------------------------------------------------------
# the sections


def _header(r: RealResults) -> list[str]:
    k, ev, bk = r.settings.num_depths, r.ev, r.bar_k
    offline, served = ev.acceptance_length.get(bk), _vllm_al(r, bk)
    verdict = "" if r.al_bar is None else (
        f" (aim: ≥ {r.al_bar} by vLLM's count — {_met(r)}"
        + ("" if served is not None else ", judged on the offline prediction: no vLLM here") + ")")
    return [
        "# peagle real-model demo report\n",
        f"A P-EAGLE draft (K = {k}) trained end to end on this CPU for **SmolLM2-135M-Instruct**, with the "
        "`regenerate → prepare → train → export → eval` a user runs on any model. The target wrote every "
        "training answer; acceptance is measured on held-out prompts of five kinds, offline (exact, vLLM's "
        "greedy parallel-drafting semantics) and, where vLLM is installed, by vLLM itself serving `draft/`.\n",
        f"**Mean acceptance length at K = {bk}: {fmt(served)} by vLLM's counters, {fmt(offline)} predicted "
        f"offline** on {len(ev.prompts)} held-out prompts{verdict}.\n",
    ]


def _per_kind(r: RealResults) -> list[str]:
    k = r.ev.num_speculative_tokens
    lines = [f"AL per prompt kind at K = {k} (offline; pooled = 1 + accepted / drafts over the kind's drafts, "
             "vLLM's definition):\n",
             "| kind | prompts | AL (pooled) | mean per-prompt AL | useful AL (pooled) |", "|---|---:|---:|---:|---:|"]
    for kind, m in al_by_kind(r.ev.prompts, r.heldout_kinds).items():
        lines.append(f"| {kind} | {m['prompts']} | {fmt(m['al'])} | {fmt(m['mean_prompt_al'])} "
                     f"| {fmt(m['useful_al'])} |")
    return [*lines, ""]


def _target(r: RealResults) -> list[str]:
    g, p, s = r.regen, r.prep, r.settings
    regen_s = r.stage_seconds.get("regenerate", float("nan"))
    return [
        "## Target and data\n",
        "- SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49 152 — every row used —, tied "
        "embeddings, ChatML template with a default system prompt), fp32, from `peagle.target.real_model` "
        + ("(already built in the cache: not rebuilt)" if r.target_cached else "(built by this run)"),
        f"- prompts generated from seed {s.seed} (`peagle.demo.real_corpus`): {s.num_prompts} for training; held "
        "out, never trained on: " + ", ".join(f"{n} {kind}" for kind, n in r.heldout.items())
        + f" (`data/heldout/<kind>.jsonl`), the first {s.eval_per_kind} of each kind evaluated",
        f"- regenerated by the target with {g['engine']}, greedy, ≤ {s.regen_max_tokens} tokens a turn: "
        f"{g['records']} chats, {g['turns']} turns, **{g['tokens']:,} tokens** ({g['truncated_turns']} turns cut "
        f"at the limit) in {regen_s:.0f}s = {g['tokens'] / regen_s if regen_s else float('nan'):.0f} tok/s "
        "(engine start included)",
        f"- `peagle prepare`: {p['examples']} examples, {p['tokens']:,} tokens ({p['supervised_tokens']:,} "
        f"supervised); **mask token id {p['mask_token_id']}**: {p['mask_token_reason']}"
        + (f"; target states cached once (`--cache states`, computed by {p['states']}), so training never runs "
           "the 135M target" if p.get("states") else ""),
        "",
    ]


def _more(r: RealResults, d: DraftStats) -> list[str]:
    """AL vs steps during training and what more steps or data would give."""
    k, s = r.settings.num_depths, r.settings
    epochs = d.tokens / r.prep["tokens"] if r.prep.get("tokens") else float("nan")
    lines = ["## More steps or more data?\n",
             f"Training saw {d.tokens:,} tokens: {epochs:.1f} epochs of the {r.prep['tokens']:,} prepared tokens."]
    growth = al_growth(r.val_log, k)
    if growth is None:
        return [*lines, ""]
    curve = ", ".join(f"{a:.2f} @ {st}" for st, a in growth["points"])
    val = [v for v in r.val_log if v.get("loss") is not None]
    train_loss = [t["loss"] for t in r.train_log[-max(1, s.eval_every // 2):]]
    lines += [
        f"AL at K = {k} on {s.num_al_prompts} held-out prompts during training (offline, ≤ {s.al_max_new_tokens} "
        f"new tokens): {curve}.",
        f"A log-linear fit over steps ≥ {growth['fit_from']} gains **{growth['per_doubling']:+.3f} AL per doubling "
        f"of steps**, i.e. ≈ {growth['at_2x']:.2f} at {2 * len(r.train_log)} steps and ≈ {growth['at_4x']:.2f} at "
        f"{4 * len(r.train_log)} (same schedule shape; the cosine decay flattens the end of every curve, so "
        "read it as a rough guide)."
        + _gap(val[-1]["loss"] if val else None, sum(train_loss) / len(train_loss) if train_loss else None),
        "",
    ]
    return lines


def _gap(val_loss: float | None, train_loss: float | None) -> str:
    """What the validation / training loss gap says about more data."""
    if val_loss is None or train_loss is None:
        return ""
    text = f" Validation loss {fmt(val_loss)} vs training loss {fmt(train_loss)} (mean of the last steps): "
    if val_loss <= 1.1 * train_loss:
        return text + ("no sign of memorising the regenerated data yet, so more steps on the same data still pay "
                       "(and more data would too, at its regeneration cost).")
    return text + "the draft starts to fit its own data better than unseen text: more regenerated data would pay."


def _files() -> list[str]:
    return [
        "## Files\n",
        "- `eval.json`: the `peagle eval --json` output (AL for every K', per-position rates, per prompt; "
        "`vllm`: vLLM's own counters per K')",
        "- `draft/`: the exported speculators-format draft (config.json + model.safetensors); `target`: a link "
        "to the SmolLM2 directory",
        "- `train.yaml`: the training config; `run/`: checkpoint, metrics.jsonl; `prepared/`: the tokenized data; "
        "`states/`: the cached target states",
        "- `data/train_prompts.jsonl` → `data/train_chats.jsonl` (the target's answers); `data/heldout/<kind>.jsonl`: "
        "held-out prompts per kind (math ones with their `answer`), `data/heldout.jsonl`: all of them, "
        "interleaved\n",
    ]


def _reproduce(r: RealResults) -> list[str]:
    out, s, target = r.out, r.settings, _q(r.target_dir)
    heldout, vllm = _q(out / "data" / "heldout.jsonl"), ".venv-vllm/bin/peagle"
    prepare = [*prepare_command(out, r.target_dir, s), "--mask-token-id", "auto"]
    if s.cache_states:
        prepare += ["--cache", str(out / "states")] + (["--engine", "vllm"] if r.vllm is not None else [])
    return [
        "## Reproduce\n",
        "```bash",
        f"peagle demo --real --out {_q(out)}" + (" --quick" if r.quick else "") + "   # everything below",
        "# or stage by stage, on the data this run wrote:",
        f"{vllm} regenerate {_q(out / 'data' / 'regenerate_input.jsonl')} "
        f"--out {_q(out / 'data' / 'regenerated.jsonl')} --engine vllm --target {target} "
        f"--max-tokens {s.regen_max_tokens}   # or --engine hf",
        f"{vllm if r.vllm is not None and s.cache_states else 'peagle'} {' '.join(map(_q, prepare))}",
        f"rm -rf {_q(out / 'run')}; peagle train {_q(out / 'train.yaml')}",
        f"peagle export {_q(r.checkpoint)} {_q(out / 'draft')} --overwrite",
        f"{vllm} eval --target {target} --draft {_q(out / 'draft')} --prompts {heldout} "
        f"--max-new-tokens {s.max_new_tokens} --engine vllm --json {_q(out / 'eval.json')}",
        "```\n",
    ]


def _machine_note(r: RealResults) -> list[str]:
    end = os.getloadavg()[0]
    return [f"The machine was shared: load average {r.load_start:.1f} when the run started, {end:.1f} at the "
            f"report, on {os.cpu_count()} cores; every time above moves with that (and with the matmul rate).\n"]


def write_real_report(r: RealResults) -> dict[str, Any]:
    """Write the plots and ``report.md`` into ``r.out``; return the summary dict (no timings)."""
    out = r.out
    plot_files = report_plots(r)
    stats = draft_stats(out, r.train_log)
    dtype = [f"- autocast: **{r.autocast or 'n/a'}** (`train.dtype: auto`: bf16 where this CPU's bf16 matmuls "
             "measure ≥ 1.5× fp32); evaluation in fp32" + ("; lm_head frozen" if r.settings.freeze_lm_head else "")]
    lines = [*_header(r), *acceptance_section(r.ev, "Acceptance (held-out prompts)"), *_per_kind(r), *_target(r),
             *draft_and_training_section(r, stats, dtype), *_more(r, stats), *timings_section(r), *_machine_note(r),
             *plots_section(out, plot_files), *_files(), *_reproduce(r), *environment_section()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    kinds = al_by_kind(r.ev.prompts, r.heldout_kinds)
    served = (r.ev.vllm or {}).get("by_k", {})
    return summary_of(
        r, stats, plot_files,
        vllm_acceptance_length={kk: v.get("acceptance_length") for kk, v in served.items()} or None,
        vllm_agrees=(r.ev.vllm or {}).get("agrees"),
        acceptance_length_by_kind={kind: m["al"] for kind, m in kinds.items()},
        regenerated_tokens=r.regen["tokens"], mask_token_id=r.prep["mask_token_id"], autocast=r.autocast,
        target_cached=r.target_cached)


def log_real_outcome(r: RealResults, summary: dict[str, Any], log: Callable[[str], None]) -> None:
    """The closing lines: the AL table (vLLM's AL beside it), AL at the bar's K, the report path."""
    log("")
    log(al_table(r.ev))
    bk = r.bar_k
    served, offline = _vllm_al(r, bk), r.ev.acceptance_length.get(bk)
    if r.ev.vllm:
        log("vLLM's counters: " + "  ".join(f"K={kk} AL {fmt(v)}" for kk, v in
                                            (summary.get("vllm_acceptance_length") or {}).items())
            + f"  (agree with the prediction: {'yes' if r.ev.vllm.get('agrees') else 'no'})")
    met = "" if r.al_bar is None else f" (aim {r.al_bar}: {_met(r)})"
    log(f"\n[demo] mean AL at K={bk}: {fmt(served)} by vLLM, {fmt(offline)} offline{met}")
    log(f"[demo] total {summary['total_s']:.0f}s; report: {r.out / 'report.md'}")

