"""Drafts trained by peagle the way users train them, for the suite that serves them in the real vLLM.

Each case: a tiny random-init target (Llama or Qwen3, head_dim 32 — vLLM's CPU attention needs ≥ 32)
saved with ``save_pretrained``; training chats whose answers the target itself wrote (greedy);
``peagle prepare`` (full or reduced draft vocabulary) → ``peagle train`` → the export it writes
(``run/final``). Nothing is patched: vLLM loads the export unchanged.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from peagle.cli import main
from peagle.demo.offline_models import tiny_target, train_chat_tokenizer

WORDS = ["pear", "apple", "fig", "plum", "kiwi", "lime", "date", "melon"]
NEW_TOKENS = 32
NUM_EVAL_PROMPTS = 16
K = 4

# tests/stream_helpers.py is shared with the fast suite's streamed-states tests (appended: this directory's
# modules, conftest among them, come first)
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            a = rng.randrange(1, 9)
            out.append(f"count from {a} to {a + rng.randrange(2, 9)}")
        elif kind == 1:
            out.append("sort these words: " + ", ".join(rng.sample(WORDS, 3)))
        else:
            out.append(f"what is {rng.randrange(1, 20)} + {rng.randrange(1, 20)}?")
    return out


CORPUS = _prompts(200, 1) + ["3 4 5 6 7 8 9", "apple, fig, pear", "12 + 7 = 19"] * 20


@dataclass
class Case:
    name: str
    target: Path
    draft: Path  # the export `peagle train` wrote (speculators format)
    prompts: Path  # held-out prompts (JSONL)


def _regenerate(target_dir: Path, prompts: list[str], path: Path, *, text: bool = False) -> None:
    """Chats whose assistant turns the target wrote greedily (as P-EAGLE recipes train); with `text`, plain
    ``{"text": prompt + continuation}`` records (a base model continuing each prompt, no chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peagle.eval import greedy_generate, tokenize_prompts

    tok = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    ids = tokenize_prompts(tok, [{"text" if text else "prompt": p} for p in prompts])
    stops = list(model.generation_config.eos_token_id)
    gens = greedy_generate(model, ids, [NEW_TOKENS] * len(ids), stops, tok.pad_token_id, batch_size=32)
    with open(path, "w") as f:
        for p, g in zip(prompts, gens, strict=True):
            answer = tok.decode(g.tokens[:-1] if g.stop_reason == "eos" else g.tokens, skip_special_tokens=True)
            record = {"text": p + answer} if text else {"messages": [{"role": "user", "content": p},
                                                                      {"role": "assistant", "content": answer}]}
            f.write(json.dumps(record) + "\n")


def _text_tokens_only(target_dir: Path) -> None:
    """Zero the lm_head rows of tokens that are not whole printable text (lone bytes of a UTF-8 character):
    a random target never emits them then, so its answers are text that survives the OpenAI API's
    detokenization (the servers return text, not ids) and comparisons by string are exact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    special = set(tok.all_special_ids)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        for i in range(w.shape[0]):
            text = tok.decode([i]) if i < len(tok) else ""
            if i not in special and not (text.isascii() and text.isprintable() and text.strip()):
                w[i].zero_()
    model.save_pretrained(target_dir)


def build_case(root: Path, kind: str, draft_vocab: int | None) -> Case:
    name = f"{kind}-{'full' if draft_vocab is None else f'vocab{draft_vocab}'}"
    root.mkdir(parents=True, exist_ok=True)
    tok = train_chat_tokenizer(CORPUS, 300, root / "tokenizer")
    target = tiny_target(kind, tok, root / "target", hidden_size=128, num_heads=4, num_kv_heads=2,
                         num_layers=4 if kind == "llama" else 5, intermediate_size=256, seed=1)
    _text_tokens_only(target)
    chats = root / "chats.jsonl"
    _regenerate(target, _prompts(160, 2), chats)
    prompts = root / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(NUM_EVAL_PROMPTS, 3)))
    vocab_args = [] if draft_vocab is None else ["--draft-vocab-size", str(draft_vocab)]
    assert main(["prepare", str(chats), "--target", str(target), "--out", str(root / "data"),
                 "--max-length", "128", "--no-progress", *vocab_args]) == 0
    cfg = {
        "data": {"dataset": str(root / "data"), "max_length": 128},
        "model": {"target": str(target), "num_layers": 1, "num_depths": K, "init_lm_head_from_target": True},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"output_dir": str(root / "run"), "micro_batch_size": 4, "max_steps": 80, "save_every": 0,
                  "progress": False, "tensorboard": False, "device": "cpu"},
    }
    (root / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "train.yaml")]) == 0
    return Case(name, target, root / "run" / "final", prompts)


CASES = [("llama", None), ("llama", 200), ("qwen3", None), ("qwen3", 200)]


class _Cases(dict):
    """Cases built on first use (a test of one case does not train the other three)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Case:
        kind, _, vocab = name.partition("-")
        case = build_case(self.root / name, kind, None if vocab == "full" else int(vocab.removeprefix("vocab")))
        self[name] = case
        return case


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    torch.set_num_threads(2)
    return _Cases(tmp_path_factory.mktemp("served"))
