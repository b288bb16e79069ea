"""The EAGLE-3 architecture check without vLLM: `peagle export` warns in one line, `peagle eval --engine vllm`
stops in one line (exit 1) before loading the target or starting an engine. The check itself
(`vllm_engine.eagle3_support_problem`) is replaced here; tests_vllm/test_base_model.py runs the real one."""

from __future__ import annotations

import json

import pytest
import torch

from peagle.cli import main
from peagle.model.config import DraftConfig
from peagle.model.draft import PEagleDraft

PROBLEM = "vLLM 0.0-test cannot serve the target's architecture LlamaForCausalLM with an EAGLE-3 / P-EAGLE draft"


@pytest.fixture
def refuse_llama(monkeypatch):
    """vLLM (as faked here) lacks EAGLE-3 support for LlamaForCausalLM; no engine may start."""
    import peagle.target.vllm_engine as engine

    def problem(architectures):
        return PROBLEM if "LlamaForCausalLM" in architectures else None

    def no_engine(*args, **kwargs):
        raise AssertionError("a vLLM engine was started")

    monkeypatch.setattr(engine, "eagle3_support_problem", problem)
    monkeypatch.setattr(engine, "served_counters", no_engine)
    monkeypatch.setattr(engine, "import_llm", no_engine)


def _draft(llama_dir) -> PEagleDraft:
    from transformers import AutoConfig

    torch.manual_seed(0)
    target_config = AutoConfig.from_pretrained(llama_dir)
    return PEagleDraft(DraftConfig.from_target(target_config, mask_token_id=target_config.vocab_size - 1,
                                               num_hidden_layers=1, intermediate_size=64,
                                               num_speculative_tokens=2, verifier_name_or_path=str(llama_dir)))


def test_export_warns_in_one_line(refuse_llama, llama_dir, tmp_path, capsys):
    from peagle.store.export import export_draft, serving_warnings

    draft = _draft(llama_dir)
    assert draft.config.verifier_architectures == ["LlamaForCausalLM"]
    assert serving_warnings(draft.config) == [PROBLEM]
    export_draft(draft, tmp_path / "draft")
    err = capsys.readouterr().err
    assert err == f"peagle export: warning: {PROBLEM}\n"
    assert (tmp_path / "draft" / "model.safetensors").is_file()  # a warning, not a refusal
    draft.config.verifier_architectures = ["Qwen3ForCausalLM"]
    assert serving_warnings(draft.config) == []


def test_export_without_vllm_checks_nothing(llama_dir):
    """Where vLLM is not installed the export works as before: no architecture warning, nothing raised."""
    from peagle.target.vllm_engine import VLLMError, eagle3_support_problem

    try:
        eagle3_support_problem(["LlamaForCausalLM"])
    except VLLMError:
        pass
    else:
        pytest.skip("vLLM is installed here (tests_vllm/ checks the real registry)")
    from peagle.store.export import serving_warnings

    assert serving_warnings(_draft(llama_dir).config) == []


def test_eval_engine_vllm_stops_before_loading_anything(refuse_llama, llama_dir, tmp_path, capsys, monkeypatch):
    import peagle.target.hf as hf

    def no_target(*args, **kwargs):
        raise AssertionError("the target was loaded")

    monkeypatch.setattr(hf.Target, "__init__", no_target)
    _draft(llama_dir).save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "count from 3 to"}) + "\n")
    argv = ["eval", "--target", str(llama_dir), "--draft", str(tmp_path / "draft"), "--prompts", str(prompts),
            "--max-new-tokens", "4", "--device", "cpu", "--no-progress", "--engine", "vllm"]
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.err == f"peagle eval: error: {PROBLEM}\n" and out.out == ""


def test_evaluate_stops_before_generating(refuse_llama, llama_dir, tmp_path, monkeypatch):
    """The library path: `evaluate(..., vllm_draft_dir=...)` refuses before any continuation is generated."""
    from peagle.eval import ContinuationSet, evaluate
    from peagle.target.hf import Target
    from peagle.target.vllm_engine import VLLMError

    def no_generation(*args, **kwargs):
        raise AssertionError("continuations were generated")

    monkeypatch.setattr(ContinuationSet, "prepare", no_generation)
    draft = _draft(llama_dir)
    target = Target(llama_dir, device="cpu", aux_layer_ids=draft.config.aux_layer_ids)
    with pytest.raises(VLLMError, match="^vLLM 0.0-test cannot serve .* LlamaForCausalLM"):
        evaluate(target, draft, [{"text": "count"}], 4, progress=False, print_report=False,
                 vllm_draft_dir=tmp_path)
