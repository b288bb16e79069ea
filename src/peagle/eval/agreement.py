"""Why the real vLLM's serving run differs from the offline prediction: pure classification, no engine.

`peagle eval --engine vllm` compares, per prompt and per K', vLLM's output tokens and its per-request
spec-decode rounds (accepted draft tokens of every round) with the offline prediction (HF's greedy
continuation and the simulated rounds). A prompt that does not agree is one of:

- an **output difference**: vLLM generated another token than HF's greedy continuation at some position.
  Two engines computing the same fp32 model in different kernels (and batch shapes) round differently;
  where the target's two best logits are nearly tied, the argmax can flip. That is a property of the
  target and the engines, not of the draft: the counters after that position are counted on another text
  and cannot be compared. It is a **near-tie** when, at that position, the logit margin between the two
  tokens the engines chose is at most the threshold on both engines (`NEAR_TIE`, ``--near-tie``; it is
  the top-2 margin when, as usual, each engine's runner-up is the other's choice); a larger margin is not
  explained by rounding and fails the comparison.
- a **draft disagreement**: a round whose tokens lie entirely before the first differing output position
  (or any round, when the outputs are equal) accepted another number of draft tokens in vLLM than
  predicted. The draft saw the same verified tokens on both engines, so this is what exit status 4 is for.
  One exception is classified as numerics too: the last round of a request compares its drafts with the
  target's tokens *past* the end of the output (vLLM counts those, docs/evaluation.md); vLLM never emits
  them, so when the first differing round is the last one and it reads past the end, and HF's top-2
  margin at a token it read there is a near-tie, the row is a ``lookahead`` difference (numerics).

Positions are continuation indices (0 = the first generated token). Margins are logit differences
(top-1 minus top-2; vLLM's log-probabilities differ from its logits by one constant per position, so
the difference of two log-probabilities is the logit margin).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "NEAR_TIE",
    "VLLM_LOGPROBS",
    "classify_prompt",
    "first_difference",
    "judge",
    "lookahead_positions",
    "margins",
    "near_tie_threshold",
    "rounds_before",
    "summarise_agreement",
    "top2_margin",
]

# Default near-tie thresholds (logits), per serving precision; docs/evaluation.md "What exact means on real
# models" gives the measurement behind them: several times the largest logit difference measured between
# HF and vLLM at the same positions, far below the margins of ordinary tokens.
NEAR_TIE = {"fp32": 0.05, "bf16": 1.0}
# vLLM's log-probabilities requested per generated token: the margins use the top 2; a few more find HF's token
# where three tokens are nearly tied (common at bf16's logit resolution) so the pair's margin is known.
VLLM_LOGPROBS = 5


def near_tie_threshold(dtype: str, override: float | None = None) -> float:
    """The near-tie threshold (logits) for a serving precision ("fp32" | "bf16"), or `override`."""
    if override is not None:
        if not override >= 0:
            raise ValueError(f"the near-tie threshold must be a logit margin >= 0, got {override!r}")
        return float(override)
    return NEAR_TIE[dtype]


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (the shorter one's length when one is a prefix of the
    other), None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _last_read(anchor: int, accepted: int, k: int) -> int:
    """The last continuation index a round reads: its draft for depth d predicts index anchor + d + 2
    (anchor = the continuation index of the round's last verified token before the bonus, −1 after
    prefill) and the verifier compares depths 0..min(accepted, k − 1)."""
    return anchor + 2 + min(accepted, k - 1)


def rounds_before(accepted: Sequence[int], k: int, position: int | None) -> int:
    """How many leading rounds of a request (accepted count per round, at K' = `k`) read only
    continuation indices < `position`: their outcome cannot depend on the token at `position`.
    All rounds when `position` is None (the outputs are equal)."""
    if position is None:
        return len(accepted)
    anchor = -1
    for i, m in enumerate(accepted):
        if _last_read(anchor, m, k) >= position:
            return i
        anchor += m + 1
    return len(accepted)


def lookahead_positions(accepted: Sequence[int], k: int, round_index: int, output_len: int) -> list[int]:
    """Continuation indices ≥ `output_len` (past the end of the output) that round `round_index` reads."""
    anchor = -1 + sum(m + 1 for m in accepted[:round_index])
    last = _last_read(anchor, accepted[round_index], k) if round_index < len(accepted) else anchor + 1 + k
    return list(range(max(output_len, anchor + 2), last + 1))


def top2_margin(logprobs: Mapping[int, float] | None) -> float | None:
    """top-1 minus top-2 of one position's {token: logit or log-probability}; None with fewer than two."""
    if not logprobs or len(logprobs) < 2:
        return None
    a, b = sorted(logprobs.values(), reverse=True)[:2]
    return float(a - b)


def margins(
    hf_top2: Mapping[int, float], vllm_top2: Mapping[int, float], hf_token: int | None, vllm_token: int | None,
    hf_logit: Callable[[int], float] | None = None,
) -> dict[str, Any]:
    """The margins at a differing position, for an output row.

    hf_top2 / vllm_top2: each engine's best {token: logit or log-probability} (at least the two best: vLLM
    returns its top-`VLLM_LOGPROBS`); hf_logit(t): HF's logit of any token (HF's whole logit vector is at
    hand). Returns both top-2 lists,
    each engine's top-2 margin (hf_top2_margin, vllm_top2_margin) and the margins that are judged: between
    the two tokens the engines chose, on each engine — hf_margin = HF logit(HF's token) − logit(vLLM's
    token), vllm_margin = vLLM log-probability(vLLM's token) − that of HF's token, None when HF's token is
    not among vLLM's returned ones (then it is at least vllm_top2_margin: not judged a near-tie). In the
    usual case, each engine's runner-up is the other's choice, both equal the top-2 margins.
    """
    hf_margin = vllm_margin = None
    if hf_token is not None and vllm_token is not None:
        if hf_logit is not None:
            hf_margin = float(hf_logit(hf_token) - hf_logit(vllm_token))
        elif hf_token in hf_top2 and vllm_token in hf_top2:
            hf_margin = float(hf_top2[hf_token] - hf_top2[vllm_token])
        if hf_token in vllm_top2 and vllm_token in vllm_top2:
            vllm_margin = float(vllm_top2[vllm_token] - vllm_top2[hf_token])
    def best2(d: Mapping[int, float]) -> list[list]:
        return [[int(t), float(v)] for t, v in sorted(d.items(), key=lambda tv: -tv[1])[:2]]

    return {"hf_top2": best2(hf_top2), "vllm_top2": best2(vllm_top2),
            "hf_top2_margin": top2_margin(hf_top2), "vllm_top2_margin": top2_margin(vllm_top2),
            "hf_margin": hf_margin, "vllm_margin": vllm_margin}


def classify_prompt(
    index: int,
    offline_tokens: Sequence[int],
    offline_rounds: Sequence[int],
    vllm_tokens: Sequence[int],
    vllm_rounds: Sequence[int],
    k: int,
) -> dict[str, Any] | None:
    """None when vLLM agrees with the prediction on prompt `index` at K' = `k`, else a row.

    The row: kind ("output" when the outputs differ, "draft" when a round that could not depend on a
    differing token accepted another count), position (first differing continuation index, None when the
    outputs are equal), round (the first round whose accepted count differs, None when none of the rounds
    compared differ), offline / vLLM tokens at the position, and both sides' drafts and accepted tokens.
    Margins and the near-tie verdict are added by the caller (`add_margins`), which has the engines.
    """
    position = first_difference(offline_tokens, vllm_tokens)
    safe = rounds_before(offline_rounds, k, position)
    first_round = next((i for i in range(safe) if i >= len(vllm_rounds) or vllm_rounds[i] != offline_rounds[i]),
                       None)
    if position is None and first_round is None and len(vllm_rounds) != len(offline_rounds):
        first_round = min(len(vllm_rounds), len(offline_rounds))
    if position is None and first_round is None:
        return None
    row: dict[str, Any] = {
        "index": index,
        "kind": "draft" if first_round is not None else "output",
        "position": position,
        "round": first_round,
        "offline_token": offline_tokens[position] if position is not None and position < len(offline_tokens)
        else None,
        "vllm_token": vllm_tokens[position] if position is not None and position < len(vllm_tokens) else None,
        "offline_drafts": len(offline_rounds), "offline_accepted": sum(offline_rounds),
        "vllm_drafts": len(vllm_rounds), "vllm_accepted": sum(vllm_rounds),
    }
    if row["kind"] == "draft" and position is None and first_round < len(offline_rounds):
        row["lookahead"] = lookahead_positions(offline_rounds, k, first_round, len(offline_tokens))
    return row


def judge(row: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Set row["near_tie"] (and turn a last-round draft row reading past the end at an HF near-tie into a
    "lookahead" numerics row) from the margins the caller put in the row: hf_margin / vllm_margin at the
    first differing position (output rows), hf_lookahead_margin (draft rows with "lookahead")."""
    if row["kind"] == "output":
        hf, vl = row.get("hf_margin"), row.get("vllm_margin")
        # |HF's margin|: HF's own greedy generation (batched, padded) may rank the pair the other way round
        # than the unpadded forward that measures it; on vLLM the margin is its own choice's, >= 0
        row["near_tie"] = hf is not None and vl is not None and abs(hf) <= threshold and vl <= threshold
    elif row.get("lookahead"):
        m = row.get("hf_lookahead_margin")
        if m is not None and m <= threshold:
            row["kind"], row["near_tie"] = "lookahead", True
        else:
            row["near_tie"] = False
    else:
        row["near_tie"] = False
    return row


def summarise_agreement(rows_by_k: Mapping[int, Sequence[dict[str, Any]]], threshold: float) -> dict[str, Any]:
    """Counts over the judged rows of every K': prompts whose outputs differ (near-ties and not), prompts
    with a draft disagreement, and `ok` — true when no draft disagrees and every output difference is a
    near-tie (what `peagle eval --engine vllm` exits 0 on)."""
    by_k: dict[str, Any] = {}
    outputs_all: set[int] = set()
    drafts_all: set[int] = set()
    not_tie_all: set[int] = set()
    for kk, rows in rows_by_k.items():
        outputs = {r["index"] for r in rows if r["kind"] in ("output", "lookahead")}
        drafts = {r["index"] for r in rows if r["kind"] == "draft"}
        not_tie = {r["index"] for r in rows if r["kind"] in ("output", "lookahead") and not r["near_tie"]}
        by_k[str(kk)] = {"outputs_differ": len(outputs), "near_ties": len(outputs - not_tie),
                         "not_near_ties": len(not_tie), "draft_disagreements": len(drafts)}
        outputs_all |= outputs
        drafts_all |= drafts
        not_tie_all |= not_tie
    return {"near_tie_threshold": threshold, "by_k": by_k,
            "prompts_outputs_differ": sorted(outputs_all), "prompts_draft_disagrees": sorted(drafts_all),
            "prompts_not_near_tie": sorted(not_tie_all),
            "ok": not drafts_all and not not_tie_all}
