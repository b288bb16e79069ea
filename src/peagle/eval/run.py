"""`evaluate()`: the whole `peagle eval` run as a library call, and the checks around it.

Before any work: `check_outputs` (usable --out / --json paths), `load_draft` (export, checkpoint or run
directory), `check_verifier` (the draft was trained for this target), and with --engine vllm
`check_vllm_serves` (the installed vLLM supports EAGLE-3 drafts for the target's architecture). Then
prepare the continuations, score the draft in one pass, simulate vLLM's rounds for every K' ≤ K, and
report (table, JSON, PNGs). With a speculators-format draft directory, `compare_with_vllm` serves the
same prompts in the real vLLM, puts its counters beside the prediction and says why they differ where
they do (`peagle.eval.agreement`; docs/evaluation.md, "--engine vllm").
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peagle.eval.continuations import ContinuationSet, context_length
from peagle.eval.errors import EvalError
from peagle.eval.prompts import load_tokenizer, stop_token_ids
from peagle.eval.report import EvalResult, format_report, write_json, write_plots
from peagle.eval.rounds import metrics_by_k, per_position_counts, rounds_by_k, summarise
from peagle.eval.tables import draft_token_tables
from peagle.model.draft import PEagleDraft

__all__ = ["check_outputs", "check_verifier", "check_vllm_serves", "compare_with_vllm", "evaluate", "load_draft"]


def evaluate(
    target: Any,
    draft: PEagleDraft,
    prompts: str | Path | Sequence[Any] | ContinuationSet,
    max_new_tokens: int = 256,
    num_speculative_tokens: int | None = None,
    out_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    *,
    tokenizer: Any = None,
    chat_template: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    print_report: bool = True,
    vllm_draft_dir: str | Path | None = None,
    allow_other_target: bool = False,
    near_tie: float | None = None,
) -> EvalResult:
    """Exact offline acceptance of `draft` on `target`'s greedy continuations of `prompts`.

    prompts: a JSONL/JSON file, a list of records (see `tokenize_prompts`) or a prepared
    `ContinuationSet`. K defaults to the draft's trained `num_speculative_tokens`. Writes the JSON
    (`json_path`) and the PNG plots (`out_dir`), prints the table, returns an `EvalResult`. With
    `vllm_draft_dir` (the draft in speculators format) the real vLLM also serves target + draft on the
    same prompts and its own counters go beside the prediction (`EvalResult.vllm`), with the prompts where
    they differ classified (`compare_with_vllm`; `near_tie`: the near-tie threshold in logits, default per
    precision).
    """
    trained_k = int(draft.config.num_speculative_tokens)
    k = int(num_speculative_tokens if num_speculative_tokens is not None else trained_k)
    if k < 1:
        raise EvalError(f"num_speculative_tokens must be >= 1, got {k}")
    if k > trained_k:
        raise EvalError(f"--num-speculative-tokens {k} exceeds the draft's trained K ({trained_k}, its num_depths): "
                        f"depths ≥ {trained_k} were never trained; use K ≤ {trained_k}")
    if int(draft.config.vocab_size) != int(target.vocab_size):
        raise EvalError(f"the draft was built for a vocabulary of {draft.config.vocab_size} tokens, the target "
                        f"has {target.vocab_size}: is it the draft of this target?")
    if not allow_other_target:
        check_verifier(draft, target, tokenizer)
    if vllm_draft_dir is not None:
        check_vllm_serves(target)  # before the continuations: a refusal costs no generation
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(prompts, ContinuationSet):
        cs = prompts
    else:
        cs = ContinuationSet.prepare(target, prompts, max_new_tokens, tokenizer=tokenizer,
                                     chat_template=chat_template, max_context=context_length(target, draft),
                                     batch_size=batch_size, lookahead=k - 1, progress=progress)
    timing["generate_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    tables = draft_token_tables(draft, cs, k, progress=progress)
    useful = rounds_by_k(cs, tables, k, useful=True)
    overall, by_k, per_prompt = summarise(cs, rounds_by_k(cs, tables, k), k, useful)
    timing["score_s"] = time.perf_counter() - t1
    result = EvalResult(k, overall, by_k, per_prompt, timing, useful_by_k=metrics_by_k(useful, k))
    if vllm_draft_dir is not None:
        t2 = time.perf_counter()
        result.vllm = compare_with_vllm(cs, rounds_by_k(cs, tables, k), target, vllm_draft_dir, k,
                                        max_context=context_length(target, draft), near_tie=near_tie)
        timing["vllm_s"] = time.perf_counter() - t2
    if out_dir is not None:
        result.files.update(write_plots(result, out_dir))
    if json_path is not None:
        result.files["json"] = write_json(result, json_path)
    if print_report:
        print(format_report(result))
        for name, path in result.files.items():
            print(f"{name}: {path}")
    return result


def check_verifier(draft: PEagleDraft, target: Any, tokenizer: Any = None) -> None:
    """Refuse a target the draft was not trained for: width, aux layers, and the recorded fingerprint
    (shape, tokenizer vocabulary, final-norm weights; `peagle.target.hf.verifier_fingerprint`)."""
    from peagle.model.config import resolve_aux_layer_ids
    from peagle.target.hf import verifier_fingerprint

    cfg = draft.config
    if int(cfg.target_hidden_size) != int(target.hidden_size):
        raise EvalError(f"the draft was trained on a target of hidden size {cfg.target_hidden_size}, this target "
                        f"has {target.hidden_size}: is it the draft of this target?")
    try:
        resolve_aux_layer_ids(cfg.aux_layer_ids, int(target.num_layers))
    except ValueError as e:
        raise EvalError(f"the draft's {e}") from None
    recorded = cfg.verifier_fingerprint
    if not recorded:
        return
    now = verifier_fingerprint(target, tokenizer if tokenizer is not None else load_tokenizer(target))
    diff = [f"{k} {recorded[k]!r} vs {now.get(k)!r}" for k in sorted(recorded) if recorded[k] != now.get(k)]
    if diff:
        raise EvalError(f"the draft was trained for another target than {target.path} ({'; '.join(diff)}); "
                        "evaluate it with its own target, or pass --allow-other-target")


def compare_with_vllm(
    cs: ContinuationSet, rounds: list[dict[int, list[int]]], target: Any, draft_dir: str | Path, k: int,
    *, max_context: int, near_tie: float | None = None,
) -> dict[str, Any]:
    """Serve `cs`'s prompts in the real vLLM for K' = 1..k; its counters beside the offline prediction, and
    why they differ.

    The same token ids, budgets (max new tokens, cut at the context) and stop ids as the prediction, all
    prompts in one batch per K'. Per prompt, vLLM's output and its own per-request rounds are compared with
    the prediction (`peagle.eval.agreement`): an output difference gets its first differing position and the
    target's logit margins there on both engines (HF: the target's logits; vLLM: its log-probabilities,
    requested with logprobs=5 in the same run), judged a near-tie against `near_tie` (default per precision,
    `agreement.NEAR_TIE`); a round that accepted another count before any differing token is a draft
    disagreement. `ok` is true when no draft disagrees and every output difference is a near-tie.
    """
    from peagle.eval import agreement
    from peagle.target.vllm_engine import served_counters

    check_vllm_serves(target)
    budgets = [min(cs.max_new_tokens, max_context - len(p)) for p in cs.prompt_ids]
    stops = stop_token_ids(target, load_tokenizer(target))
    # room for the longest request plus generous room for its last rounds' draft slots (vLLM clips drafts
    # near max_model_len: measured, +K+1 changed its counters, +19 did not), not the whole context (KV memory)
    longest = max(len(p) + b for p, b in zip(cs.prompt_ids, budgets, strict=True))
    engine_len = min(max_context, longest + 4 * (k + 1) + 64)
    precision = "bf16" if target.dtype == torch.bfloat16 else "fp32"
    threshold = agreement.near_tie_threshold(precision, near_tie)
    dtype = "bfloat16" if precision == "bf16" else "float32"  # vLLM serves as the prediction ran
    served = served_counters(target.path, draft_dir, cs.prompt_ids, budgets, stops, range(1, k + 1),
                             max_model_len=engine_len, dtype=dtype, logprobs=agreement.VLLM_LOGPROBS)
    out: dict[str, Any] = {"by_k": {}, "agrees": True, "differences": {}, "dtype": precision}
    hf_cache: dict[tuple[int, int], dict[int, float]] = {}
    rows_by_k: dict[int, list[dict[str, Any]]] = {}
    for kk, res in served.items():
        offline = [m for r in rounds for m in r[kk]]
        mine = {"num_drafts": len(offline), "num_accepted_tokens": sum(offline),
                "accepted_per_position": per_position_counts(offline, kk)}
        agrees = all(res[key] == mine[key] for key in mine)
        same_outputs = sum(o == c for o, c in zip(res["outputs"], cs.continuations, strict=True))
        out["by_k"][str(kk)] = {**{key: v for key, v in res.items() if key not in ("outputs", "rounds", "logprobs")},
                                "offline": mine, "agrees": agrees, "outputs_equal_offline": same_outputs}
        out["agrees"] &= agrees
        rows = []
        for j, r in enumerate(rounds):
            vllm_rounds = res["rounds"][j]
            if vllm_rounds is None:
                raise EvalError("vLLM did not report its per-request spec-decode rounds "
                                "(per_request_spec_decode_metrics): this vLLM is too old for --engine vllm")
            row = agreement.classify_prompt(j, cs.continuations[j], r[kk], res["outputs"][j], vllm_rounds, kk)
            if row is None:
                continue
            if row["kind"] == "output":
                pos = row["position"]
                logits = _hf_logits(target, cs, j, pos, hf_cache)
                values, tokens = logits.topk(2)
                hf = {int(t): float(v) for t, v in zip(tokens.tolist(), values.tolist(), strict=True)}
                lp = res.get("logprobs", [[]] * len(rounds))[j]
                vl = dict(lp[pos]) if pos < len(lp) else {}
                row.update(agreement.margins(hf, vl, row["offline_token"], row["vllm_token"],
                                             hf_logit=lambda t, x=logits: float(x[t])))
            elif row.get("lookahead"):
                tops = [_hf_logits(target, cs, j, pos, hf_cache).topk(2).values for pos in row["lookahead"]]
                row["hf_lookahead_margin"] = min((float(v[0] - v[1]) for v in tops), default=None)
            rows.append(agreement.judge(row, threshold))
        rows_by_k[kk] = rows
        if rows:
            out["differences"][str(kk)] = rows
    summary = agreement.summarise_agreement(rows_by_k, threshold)
    for kk, counts in summary.pop("by_k").items():  # the per-K' counts beside vLLM's counters
        out["by_k"][kk].update(counts)
    out.update(summary)
    return out


@torch.no_grad()
def _hf_logits(target: Any, cs: ContinuationSet, j: int, pos: int, cache: dict) -> torch.Tensor:
    """The target's logits [V] (fp32, CPU) for continuation index `pos` of prompt j: after prompt +
    continuation[:pos] (the lookahead tokens past the end continuing it)."""
    key = (j, pos)
    if key not in cache:
        seq = cs.prompt_ids[j] + (cs.continuations[j] + (cs.lookahead[j] if j < len(cs.lookahead) else []))[:pos]
        ids = torch.tensor([seq], dtype=torch.long, device=target.device)
        cache[key] = target.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float().cpu()
    return cache[key]


def check_vllm_serves(target: Any) -> None:
    """Stop (VLLMError, one line) before any vLLM engine starts when the installed vLLM's model class for the
    target's architecture lacks EAGLE-3 support: vLLM itself would refuse only after starting an engine.

    target: a loaded `Target`, or the target's directory (its config.json read: checked before loading it).
    """
    from peagle.target.vllm_engine import check_eagle3_support

    if isinstance(target, str | Path):
        try:
            config = json.loads((Path(target) / "config.json").read_text())
        except (OSError, ValueError):
            return  # not a readable model directory: loading the target says what is wrong
        architectures = config.get("architectures") if isinstance(config, dict) else None
    else:
        architectures = getattr(getattr(target, "hf_config", None), "architectures", None)
    check_eagle3_support(list(architectures or []))


def load_draft(path: str | Path, device: str | torch.device = "cpu") -> PEagleDraft:
    """An exported draft, a training checkpoint (verified) or a run directory (its newest complete
    checkpoint): resolved by `peagle.store.export.find_draft_dir`, as `peagle export` does."""
    from peagle.store.export import ExportError, find_draft_dir

    try:
        draft_dir = find_draft_dir(path)
    except ExportError as e:
        raise EvalError(f"--draft {e}") from None
    try:
        return PEagleDraft.from_pretrained(draft_dir, device=device)
    except (OSError, ValueError) as e:
        raise EvalError(f"--draft {draft_dir}: {e}") from None


def check_outputs(out_dir: str | Path | None, json_path: str | Path | None) -> None:
    """--out must be a usable directory and --json a usable file path (checked before any work); without
    --json, --out/eval.json must be writable too."""
    from peagle.store.rundir import OutputPathError, check_output_dir, check_output_file

    try:
        if out_dir is not None:
            check_output_dir(out_dir, "--out")
            if json_path is None:
                check_output_file(Path(out_dir) / "eval.json", "--out")
        if json_path is not None:
            check_output_file(json_path, "--json")
    except OutputPathError as e:
        raise EvalError(str(e)) from None
