"""vLLM's greedy rounds and counters over a draft-token table: pure functions, no model.

Conventions (docs/conventions.md). Tokens x_0..x_{T−1} = prompt x_0..x_{P−1} + greedy continuation
x_P..x_{T−1}. Depth d of anchor a predicts x_{a+d+2} (depth 0 = the bonus slot). Rounds: the first
draft after prefill has anchor a = P−1; a round accepts m = the longest prefix of depths 0..K−1 whose
draft equals the target's token, the next anchor is a + m + 1, and a round is proposed while the
request still runs after its bonus token (a + 2 ≤ T − 1), even when fewer than K tokens remain.

What counts as accepted (docs/evaluation.md, "What vLLM counts"): vLLM's counters include the last
round's drafts that agree with the target past the stop token or past max_tokens, so by default
every depth is compared with the target's tokens extended K − 1 past each end
(`ContinuationSet.lookahead`); the "useful" figure stops at the end of the output.

Metrics follow vLLM: num_drafts (rounds), AL = 1 + accepted / drafts, cumulative per-position rates
(rate[i] = fraction of drafts with ≥ i + 1 accepted), draft acceptance rate = accepted / (drafts · K).
AL for K' < K is a separate simulation over the same table (the path of anchors changes with K').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peagle.eval.errors import EvalError

if TYPE_CHECKING:
    from peagle.eval.continuations import ContinuationSet

__all__ = ["acceptance_metrics", "leading_matches", "scalar_metrics", "simulate_rounds"]


def acceptance_metrics(accepted_counts: Sequence[int], k: int) -> dict[str, Any]:
    """vLLM's speculative-decoding metrics from the accepted count of every draft round.

    Returns num_drafts, num_draft_tokens (= drafts·K), num_accepted_tokens, acceptance_length
    (1 + accepted/drafts, the bonus token included), per_position (cumulative: rate[i] = fraction
    of drafts whose first i+1 tokens were accepted, so AL = 1 + Σ rate) and draft_acceptance_rate
    (accepted / draft tokens). Rates are NaN when there was no draft.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"K must be an int >= 1, got {k!r}")
    counts = [int(m) for m in accepted_counts]
    bad = [m for m in counts if not 0 <= m <= k]
    if bad:
        raise ValueError(f"accepted counts must lie in [0, K={k}], got {bad[:5]}")
    drafts = len(counts)
    accepted = sum(counts)
    nan = float("nan")
    per_pos_counts = per_position_counts(counts, k)
    return {
        "num_drafts": drafts,
        "num_draft_tokens": drafts * k,
        "num_accepted_tokens": accepted,
        "acceptance_length": 1.0 + accepted / drafts if drafts else nan,
        "per_position": [c / drafts if drafts else nan for c in per_pos_counts],
        "draft_acceptance_rate": accepted / (drafts * k) if drafts else nan,
    }


def per_position_counts(rounds: Sequence[int], k: int) -> list[int]:
    """vLLM's accepted_per_pos: how many drafts had depth i accepted (i.e. at least i + 1 accepted)."""
    return [sum(1 for m in rounds if m >= i + 1) for i in range(k)]


def leading_matches(draft_tokens: Tensor, tokens: Tensor | Sequence[int]) -> Tensor:
    """[n]: for each anchor a, how many leading depths d have draft_tokens[a, d] == x_{a+d+2}.

    draft_tokens [n, K] holds target ids (−1 = not computed); tokens = the whole sequence x (prompt +
    continuation). Depths whose token would lie past the end never match, so the result is already
    capped at the T − a − 2 tokens that remain after the bonus token.
    """
    x = torch.as_tensor(tokens, dtype=torch.long).cpu()
    table = draft_tokens.cpu().long()
    n, k = table.shape
    t = x.numel()
    idx = torch.arange(n)[:, None] + torch.arange(k)[None, :] + 2
    valid = idx <= t - 1
    truth = x[idx.clamp(max=max(t - 1, 0))] if t else torch.full_like(idx, -1)
    match = (table == truth) & valid & (table >= 0)
    return match.long().cumprod(dim=1).sum(dim=1)


def simulate_rounds(runs: Tensor | Sequence[int], prompt_len: int, seq_len: int, k: int) -> list[int]:
    """vLLM's greedy rounds: accepted count per round from per-anchor leading-match lengths.

    runs[a] = leading_matches(...)[a] (computed with any K_max ≥ k). Start at anchor P − 1, accept
    m = min(runs[a], k), move to a + m + 1, repeat while a + 2 ≤ T − 1 (the request still runs).
    """
    runs = [int(r) for r in (runs.tolist() if isinstance(runs, Tensor) else runs)]
    counts = []
    a = prompt_len - 1
    while a + 2 <= seq_len - 1:
        m = min(runs[a], k)
        counts.append(m)
        a += m + 1
    return counts


def rounds_by_k(cs: ContinuationSet, tables: list[Tensor], k: int, *, useful: bool = False
                 ) -> list[dict[int, list[int]]]:
    """Per prompt, {K': accepted count per round} for K' = 1..K.

    Default: vLLM's counters, which compare the last round's drafts with the target's tokens past the end
    of the output too (`lookahead`); ``useful=True``: accepted tokens counted up to the end of the output.
    The rounds themselves are the same either way.
    """
    out = []
    for j, table in enumerate(tables):
        seq = cs.sequence(j)
        truth = seq
        if not useful:
            ahead = cs.lookahead[j] if j < len(cs.lookahead) else []
            if len(ahead) < k - 1 and cs.stop_reasons[j] != "context":
                raise EvalError(f"prompt {j}: the prepared set keeps {len(ahead)} target tokens past the end, "
                                f"vLLM's counters at K={k} need {k - 1} (ContinuationSet.prepare(lookahead=...))")
            truth = seq + list(ahead)
        runs = leading_matches(table, truth).tolist()
        out.append({kk: simulate_rounds(runs, len(cs.prompt_ids[j]), len(seq), kk) for kk in range(1, k + 1)})
    return out


def summarise(cs: ContinuationSet, rounds: list[dict[int, list[int]]], k: int,
               useful: list[dict[int, list[int]]] | None = None) -> tuple[dict, dict, list]:
    """(metrics at K, {K': metrics}, per-prompt rows) of a prepared set's rounds."""
    by_k = metrics_by_k(rounds, k)
    per_prompt = []
    for j, r in enumerate(rounds):
        met = acceptance_metrics(r[k], k)
        row = {
            "index": j,
            "prompt_tokens": len(cs.prompt_ids[j]),
            "generated_tokens": len(cs.continuations[j]),
            "stop_reason": cs.stop_reasons[j],
            **met,
            "acceptance_length_by_k": {str(kk): acceptance_metrics(r[kk], kk)["acceptance_length"]
                                       for kk in range(1, k + 1)},
            "accepted_per_round": list(r[k]),
        }
        if useful is not None:
            row["useful_acceptance_length"] = acceptance_metrics(useful[j][k], k)["acceptance_length"]
            row["useful_accepted_per_round"] = list(useful[j][k])
        if j < len(cs.completions):
            row["completion"] = cs.completions[j]
        per_prompt.append(row)
    return by_k[k], by_k, per_prompt


def metrics_by_k(rounds: list[dict[int, list[int]]], k: int) -> dict[int, dict[str, Any]]:
    """vLLM's metrics for every K' = 1..K over all prompts' rounds."""
    return {kk: acceptance_metrics([m for r in rounds for m in r[kk]], kk) for kk in range(1, k + 1)}


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flat float scalars of an `acceptance_on` result for a metrics log / TensorBoard:
    al, al_k{K'}, accept_pos{i} (cumulative, 1-based), draft_accept_rate, drafts."""
    out = {f"{prefix}al": float(metrics["acceptance_length"]),
           f"{prefix}draft_accept_rate": float(metrics["draft_acceptance_rate"]),
           f"{prefix}drafts": float(metrics["num_drafts"])}
    for kk, al in metrics.get("acceptance_length_by_k", {}).items():
        out[f"{prefix}al_k{kk}"] = float(al)
    for i, r in enumerate(metrics["per_position"]):
        out[f"{prefix}accept_pos{i + 1}"] = float(r)
    return out
