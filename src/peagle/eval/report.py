"""What `peagle eval` hands back: `EvalResult`, its JSON (the `--json` schema), the terminal table
and the PNG plots. Formatting only; the numbers come from `peagle.eval.rounds`.

NaN rates (no draft) are written as JSON null; the table shows them as "n/a".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "END_CONVENTION", "USEFUL_CONVENTION", "EvalResult", "format_report", "format_vllm_agreement", "write_json",
    "write_plots",
]

END_CONVENTION = (
    "vLLM's counters: rounds while the request runs after its bonus token (a+2 <= T-1); in the last round "
    "every draft token the verifier accepts counts, also past the stop token or max_tokens"
)
USEFUL_CONVENTION = (
    "accepted tokens counted only up to the end of the output (stop token included, nothing past it): "
    "the tokens speculative decoding actually saved"
)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


@dataclass
class EvalResult:
    """Everything `evaluate` measured; `to_json()` is the `--json` schema."""

    num_speculative_tokens: int
    overall: dict[str, Any]
    by_k: dict[int, dict[str, Any]]
    prompts: list[dict[str, Any]]
    timing: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    useful_by_k: dict[int, dict[str, Any]] = field(default_factory=dict)
    vllm: dict[str, Any] | None = None  # `peagle eval --engine vllm`: the engine's own counters per K'

    @property
    def acceptance_length(self) -> dict[int, float]:
        """Mean acceptance length for every K' = 1..K."""
        return {kk: m["acceptance_length"] for kk, m in self.by_k.items()}

    @property
    def per_position(self) -> list[float]:
        return list(self.overall["per_position"])

    @property
    def num_drafts(self) -> int:
        return int(self.overall["num_drafts"])

    def to_json(self) -> dict[str, Any]:
        o = self.overall
        return _jsonable({
            "acceptance_length": {str(kk): v for kk, v in self.acceptance_length.items()},
            "per_position": o["per_position"],
            "num_drafts": o["num_drafts"],
            "prompts": self.prompts,
            "num_speculative_tokens": self.num_speculative_tokens,
            "draft_acceptance_rate": o["draft_acceptance_rate"],
            "num_draft_tokens": o["num_draft_tokens"],
            "num_accepted_tokens": o["num_accepted_tokens"],
            "by_k": {str(kk): m for kk, m in self.by_k.items()},
            "num_prompts": len(self.prompts),
            "generated_tokens": sum(p["generated_tokens"] for p in self.prompts),
            "semantics": "vLLM greedy parallel drafting (temperature 0), exact offline simulation",
            "end_convention": END_CONVENTION,
            "useful": {
                "meaning": USEFUL_CONVENTION,
                "acceptance_length": {str(kk): m["acceptance_length"] for kk, m in self.useful_by_k.items()},
                "by_k": {str(kk): m for kk, m in self.useful_by_k.items()},
            },
            **({"vllm": self.vllm} if self.vllm is not None else {}),
            "timing": self.timing,
        })


def write_json(result: EvalResult, path: str | Path) -> str:
    """Write `result.to_json()` (indented, parents created); returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return str(path)


def _fmt(v: float, spec: str = ".3f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def format_report(result: EvalResult, max_prompt_rows: int = 20) -> str:
    """The terminal table: AL / draft acceptance per K', per-position rates, per-prompt rows."""
    k = result.num_speculative_tokens
    n_gen = sum(p["generated_tokens"] for p in result.prompts)
    lines = [f"Acceptance (vLLM greedy parallel drafting, exact offline) — {len(result.prompts)} prompts, "
             f"{n_gen} generated tokens, {result.num_drafts} drafts at K={k}", "",
             f"{'K':>3}  {'mean AL':>8}  {'useful AL':>9}  {'draft acc.':>10}  {'drafts':>7}  {'accepted':>8}"
             + ("  | vLLM: drafts  accepted   AL     agree" if result.vllm else "")]
    for kk, m in result.by_k.items():
        useful = result.useful_by_k.get(kk, {}).get("acceptance_length", float("nan"))
        line = (f"{kk:>3}  {_fmt(m['acceptance_length']):>8}  {_fmt(useful):>9}  "
                f"{_fmt(m['draft_acceptance_rate']):>10}  {m['num_drafts']:>7}  {m['num_accepted_tokens']:>8}")
        served = (result.vllm or {}).get("by_k", {}).get(str(kk))
        if served:
            line += (f"  |       {served['num_drafts']:>6}  {served['num_accepted_tokens']:>8}  "
                     f"{_fmt(served['acceptance_length']):>5}  {'yes' if served['agrees'] else 'NO':>5}")
        lines.append(line)
    lines.append("mean AL = what vLLM's counters report (drafts accepted past the end of a request count too); "
                 "useful AL = accepted tokens inside the output only")
    lines += ["", f"per-position acceptance (cumulative) at K={k}:",
              "  " + "  ".join(f"pos{i + 1} {_fmt(r)}" for i, r in enumerate(result.per_position)), ""]
    if result.vllm:
        served = result.vllm["by_k"][str(k)]
        lines += [f"vLLM accepted tokens per position at K={k}: {served['accepted_per_position']} "
                  f"(offline {served['offline']['accepted_per_position']}); outputs equal to the offline "
                  f"continuations: {served['outputs_equal_offline']}/{len(result.prompts)}"]
        lines += format_vllm_agreement(result.vllm, len(result.prompts))
        lines.append("")
    lines.append(f"{'prompt':>6}  {'prompt tok':>10}  {'new tok':>7}  {'stop':>7}  {'drafts':>6}  {'AL':>6}")
    for p in result.prompts[:max_prompt_rows]:
        lines.append(f"{p['index']:>6}  {p['prompt_tokens']:>10}  {p['generated_tokens']:>7}  "
                     f"{p['stop_reason']:>7}  {p['num_drafts']:>6}  {_fmt(p['acceptance_length'], '.2f'):>6}")
    if len(result.prompts) > max_prompt_rows:
        lines.append(f"  … {len(result.prompts) - max_prompt_rows} more prompts in the JSON output")
    return "\n".join(lines)


def _margin(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_vllm_agreement(vllm: Mapping[str, Any], num_prompts: int, max_rows: int = 20) -> list[str]:
    """The lines that say where and why vLLM differs from the prediction (`peagle.eval.agreement`)."""
    if "ok" not in vllm:  # a result written before the classification existed
        return []
    thr = vllm["near_tie_threshold"]
    n_out, n_draft = len(vllm["prompts_outputs_differ"]), len(vllm["prompts_draft_disagrees"])
    lines = [f"vLLM vs the prediction ({vllm.get('dtype', 'fp32')}; near-tie: logit margin <= {thr:g} on both "
             f"engines): {n_out}/{num_prompts} prompts whose outputs differ (engine numerics), {n_draft} with a "
             f"draft disagreement -> " + ("OK" if vllm["ok"] else "FAIL")]
    for kk, rows in vllm["differences"].items():
        c = vllm["by_k"][kk]
        lines.append(f"K={kk}: outputs differ on {c['outputs_differ']} prompts ({c['near_ties']} near-ties, "
                     f"{c['not_near_ties']} not), draft disagreements on {c['draft_disagreements']}")
        for d in rows[:max_rows]:
            counts = (f"drafts/accepted offline {d['offline_drafts']}/{d['offline_accepted']}, "
                      f"vLLM {d['vllm_drafts']}/{d['vllm_accepted']}")
            if d["kind"] == "output":
                verdict = "near-tie" if d["near_tie"] else "NOT a near-tie"
                lines.append(f"  #{d['index']} output differs at token {d['position']} (HF {d['offline_token']}, "
                             f"vLLM {d['vllm_token']}): logit margin between the two HF {_margin(d.get('hf_margin'))}, "
                             f"vLLM {_margin(d.get('vllm_margin'))} (top-2 margins {_margin(d.get('hf_top2_margin'))}, "
                             f"{_margin(d.get('vllm_top2_margin'))}) -> {verdict}; {counts}")
            elif d["kind"] == "lookahead":
                lines.append(f"  #{d['index']} last round reads past the end (tokens {d['lookahead']}), HF margin "
                             f"{_margin(d.get('hf_lookahead_margin'))} there -> near-tie; {counts}")
            else:
                where = "" if d["position"] is None else f", before the outputs differ at token {d['position']}"
                lines.append(f"  #{d['index']} DRAFT DISAGREES at round {d['round']}{where}; {counts}")
        if len(rows) > max_rows:
            lines.append(f"  … {len(rows) - max_rows} more in the JSON output (vllm.differences)")
    return lines


def write_plots(result: EvalResult, out_dir: str | Path) -> dict[str, str]:
    """acceptance_per_position.png, al_vs_k.png, al_histogram.png under out_dir."""
    from peagle.util import plots

    out_dir = Path(out_dir)
    k = result.num_speculative_tokens
    files = {
        "per_position": plots.plot_acceptance_bars(
            result.per_position, out_dir / "acceptance_per_position.png",
            title=f"Per-position acceptance at K={k} (cumulative)"),
        "al_vs_k": plots.plot_al_vs_k(result.acceptance_length, out_dir / "al_vs_k.png"),
        "al_histogram": plots.plot_al_histogram(
            [p["acceptance_length"] for p in result.prompts], out_dir / "al_histogram.png",
            title=f"Acceptance length per prompt at K={k}"),
    }
    return {name: str(path) for name, path in files.items()}
