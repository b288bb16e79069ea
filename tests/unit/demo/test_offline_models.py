"""The toy tokenizer and tiny targets behave like real hub artefacts (loaded via from_pretrained)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peagle.demo.offline_models import END, tiny_target, train_chat_tokenizer

TEXTS = [
    "count from 3 to 9",
    "3 4 5 6 7 8 9",
    "sort these words: pear, apple, fig",
    "apple, fig, pear",
    "The word apple has 5 letters: a-p-p-l-e.",
    "12 + 7 = 19",
] * 10

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "count from 3 to 9"},
    {"role": "assistant", "content": "3 4 5 6 7 8 9"},
    {"role": "user", "content": "what is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_chat_tokenizer(TEXTS, 400, d)
    return d


def test_tokenizer_round_trip_and_specials(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for text in ["count from 3 to 9", "héllo wörld, 12 + 7 = 19\n  x", ""]:
        assert tok.decode(tok(text).input_ids) == text
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    assert tok.convert_tokens_to_ids(END) != tok.unk_token_id
    assert len(tok) <= 400


def test_tokenizer_deterministic():
    a = train_chat_tokenizer(TEXTS, 400)
    b = train_chat_tokenizer(TEXTS, 400)
    assert len(a) == len(b) and a.get_vocab() == b.get_vocab()


def test_assistant_mask_marks_exactly_assistant_content(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    assert tok.decode(ids) == (
        "<|bos|><|system|>\nAnswer briefly.<|end|>\n<|user|>\ncount from 3 to 9<|end|>\n"
        "<|assistant|>\n3 4 5 6 7 8 9<|end|>\n<|user|>\nwhat is 12 + 7?<|end|>\n"
        "<|assistant|>\n12 + 7 = 19<|end|>\n"
    )
    # Split the masked tokens into contiguous runs: one per assistant turn.
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["3 4 5 6 7 8 9<|end|>", "12 + 7 = 19<|end|>"]


def test_generation_prompt(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|user|>\ncount from 3 to 9<|end|>\n<|assistant|>\n")
    assert not tok.apply_chat_template(CHAT[:2], tokenize=False).endswith("<|assistant|>\n")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_tiny_target_loads_and_runs(tok_dir, tmp_path, kind):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    path = tiny_target(kind, tok, tmp_path / kind, hidden_size=32, num_layers=4, extra_vocab=8)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == kind
    assert model.config.vocab_size == len(tok) + 8
    assert model.config.head_dim == 8 and model.config.num_hidden_layers == 4
    assert not model.config.tie_word_embeddings
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids, ids])).logits
    assert logits.shape == (2, len(ids), len(tok) + 8)
    assert logits.float().std() > 0.5  # logit_scale makes the random target peaked
    # Tokenizer saved alongside: the target directory is a complete hub-like model dir.
    assert len(AutoTokenizer.from_pretrained(path)) == len(tok)


def test_tiny_target_seeded(tok_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    a = AutoModelForCausalLM.from_pretrained(tiny_target("llama", tok, tmp_path / "a", num_layers=2, seed=3))
    b = AutoModelForCausalLM.from_pretrained(tiny_target("llama", tok, tmp_path / "b", num_layers=2, seed=3))
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    with pytest.raises(ValueError):
        tiny_target("gpt2", tok, tmp_path / "c")
