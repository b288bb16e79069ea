"""Exact offline acceptance length of a P-EAGLE draft, with vLLM's greedy semantics (`peagle eval`).

In vLLM's parallel-drafting runtime every draft slot reads only verified tokens, the target's aux
states and the fixed mask slots, never the draft's own guesses; so one teacher-forced draft forward
over the target's greedy continuation gives every token vLLM would propose, and simulating vLLM's
rounds over it gives the counters of a real greedy serving run (docs/evaluation.md).

The pipeline, one module per stage::

    prompts file / records
      │  prompts.py        load_prompts, tokenize_prompts (rendered as in training), stop_token_ids
      ▼
    token ids ──► continuations.py   ContinuationSet.prepare: the target's greedy continuations
      │                              (+ K − 1 lookahead tokens past each end) and its aux states
      ▼
    ContinuationSet ──► tables.py    draft_token_tables: one forward, every anchor × depth → [n, K] ids
      │                              (acceptance_on = tables + rounds: the training loop's hook)
      ▼
    draft-token tables ──► rounds.py simulate_rounds per K' ≤ K, acceptance_metrics (vLLM's counters)
      │
      ▼
    report.py   EvalResult, format_report, write_json, write_plots
    run.py      evaluate() ties it together; check_verifier, load_draft, check_outputs,
                compare_with_vllm (--engine vllm: the real vLLM's counters beside the prediction)
    agreement.py  why vLLM differs where it does: output differences at near-ties (engine numerics)
                apart from draft disagreements (pure functions; compare_with_vllm supplies the margins)
    literal.py  literal_speculative_decode: the round-by-round proof loop (check_exact, --check-exact)

`peagle.cli` parses `peagle eval` and calls these functions; `EvalError` (errors.py) is the one-line
user error of every stage.
"""

from __future__ import annotations

from peagle.eval.continuations import ContinuationSet, Generation, greedy_generate
from peagle.eval.errors import EvalError
from peagle.eval.literal import check_exact, literal_speculative_decode
from peagle.eval.prompts import load_prompts, load_tokenizer, stop_token_ids, tokenize_prompts
from peagle.eval.report import EvalResult, format_report, write_json, write_plots
from peagle.eval.rounds import acceptance_metrics, leading_matches, scalar_metrics, simulate_rounds
from peagle.eval.run import check_outputs, check_verifier, compare_with_vllm, evaluate, load_draft
from peagle.eval.tables import acceptance_on, draft_token_tables

__all__ = [
    "ContinuationSet",
    "EvalError",
    "EvalResult",
    "Generation",
    "acceptance_metrics",
    "acceptance_on",
    "check_exact",
    "check_outputs",
    "check_verifier",
    "compare_with_vllm",
    "draft_token_tables",
    "evaluate",
    "format_report",
    "greedy_generate",
    "leading_matches",
    "literal_speculative_decode",
    "load_draft",
    "load_prompts",
    "load_tokenizer",
    "scalar_metrics",
    "simulate_rounds",
    "stop_token_ids",
    "tokenize_prompts",
    "write_json",
    "write_plots",
]
