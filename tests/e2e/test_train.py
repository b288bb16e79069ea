"""The training loop end to end on CPU: prepare → train → export → load, exact resume, partitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peagle.cli import main
from peagle.config.training import load_config
from peagle.data import load_prepared
from peagle.run.optim import lr_factor
from peagle.run.train import train

CHATS = [
    [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "what is 12 + 7?"},
        {"role": "assistant", "content": "12 + 7 = 19"},
        {"role": "user", "content": "and 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 7"},
    ],
    [
        {"role": "user", "content": "sort these words: pear, apple, fig"},
        {"role": "assistant", "content": "apple, fig, pear"},
    ],
    [
        {"role": "user", "content": "how many letters has apple?"},
        {"role": "assistant", "content": "The word apple has 5 letters: a-p-p-l-e."},
    ],
    [{"role": "user", "content": "what is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
]


def _state(path: Path) -> dict[str, torch.Tensor]:
    from peagle.model.draft import PEagleDraft

    return PEagleDraft.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("train_data") / "chats.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 5))
    return p


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("count from 2 to 6", "sort: fig, pear")))
    return p


def _prepare(target: Path, chats: Path, out: Path, *extra: str) -> Path:
    rc = main(
        [
            "prepare",
            str(chats),
            "--target",
            str(target),
            "--out",
            str(out),
            "--max-length",
            "96",
            "--draft-vocab-size",
            "128",
            "--no-progress",
            *extra,
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def llama_data(llama_dir: Path, chats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(llama_dir, chats, tmp_path_factory.mktemp("prep") / "llama")


def _config(tmp: Path, dataset: Path, target: Path, out: str, **sections: dict[str, Any]) -> Path:
    cfg: dict[str, dict[str, Any]] = {
        "data": {"dataset": str(dataset), "max_length": 96},
        "model": {"target": str(target), "num_layers": 1, "num_depths": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {
            "dtype": "fp32",
            "output_dir": str(tmp / out),
            "micro_batch_size": 2,
            "grad_accum": 1,
            "max_steps": 3,
            "save_every": 0,
            "progress": False,
            "tensorboard": False,
        },
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_heldout_prompts_are_the_chat_prompts(llama_dir: Path, llama_data: Path, tmp_path: Path) -> None:
    """Without eval.prompts, AL prompts are validation examples cut before their first answer token:
    the same ids the chat template gives the example's first user turn with the generation prompt."""
    from transformers import AutoTokenizer

    from peagle.data import load_prepared
    from peagle.eval import tokenize_prompts
    from peagle.run.loader import TrainData

    cfg = load_config(_config(tmp_path, llama_data, llama_dir, "run", data={"val_fraction": 0.2}))
    data = TrainData(cfg, load_prepared(llama_data), rows_per_step=1)
    got = data.heldout_prompts(3)
    assert len(got) == 3
    tok = AutoTokenizer.from_pretrained(llama_dir)
    for rec, i in zip(got, data.val_ids, strict=False):
        chat = CHATS[i % len(CHATS)]
        first_answer = next(j for j, m in enumerate(chat) if m["role"] == "assistant")
        want = tokenize_prompts(tok, [{"messages": chat[:first_answer]}])[0]
        assert rec["input_ids"] == want
        assert tokenize_prompts(tok, [{"input_ids": rec["input_ids"]}])[0] == want  # used as is
    assert len(data.heldout_prompts(100)) == len(data.val_ids)  # every validation example has a prompt


def test_lr_schedule() -> None:
    f = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1) and min(f) >= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_prepare_train_export_load(
    kind: str, request: pytest.FixtureRequest, chats: Path, prompts: Path, tmp_path: Path
) -> None:
    target = request.getfixturevalue(f"{kind}_dir")
    data = _prepare(target, chats, tmp_path / "prep")
    choice = load_prepared(data).draft_choice
    assert choice["draft_vocab_size"] == 128 and choice["coverage"] > 0.9
    # llama: AL on a prompt file; qwen3: no eval.prompts → AL on the prompts of validation examples
    extra = {"eval": {"prompts": str(prompts), "max_new_tokens": 6}} if kind == "llama" else {
        "eval": {"num_prompts": 2, "max_new_tokens": 6}}
    cfg = _config(
        tmp_path,
        data,
        target,
        "run",
        data={"dataset": str(data), "max_length": 96, "val_fraction": 0.2},
        train={"eval_every": 2, "tensorboard": True},
        **extra,
    )
    assert main(["train", str(cfg), "--train.save_every", "2"]) == 0
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "split" not in r]
    val_recs = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and "acc_2" in r for r in train_recs)
    assert [r["step"] for r in val_recs] == [2, 3]
    assert val_recs[-1]["acceptance_length"] >= 1.0 and "al_k1" in val_recs[-1]
    assert any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000002", "step-00000003"]

    from peagle.model.draft import PEagleDraft

    draft = PEagleDraft.from_pretrained(out / "final")
    config = json.loads((out / "final" / "config.json").read_text())
    target_cfg = json.loads((target / "config.json").read_text())
    layers = target_cfg["num_hidden_layers"]
    from peagle.model.config import default_aux_layer_ids

    assert config["eagle_aux_hidden_state_layer_ids"] == list(default_aux_layer_ids(layers))
    assert len(set(config["eagle_aux_hidden_state_layer_ids"])) == 3  # vLLM would collapse repeats
    fp = config["peagle_verifier_fingerprint"]  # what `peagle eval` checks the target against
    assert fp["num_hidden_layers"] == layers and fp["vocab_size"] == target_cfg["vocab_size"]
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(Path(target).resolve())
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert config["draft_vocab_size"] == 128 and config["mask_token_id"] == choice["mask_token_id"]
    assert draft.config.num_hidden_layers == 1

    # `peagle export` of the last checkpoint gives the same tensors, bit for bit
    assert main(["export", str(out / "step-00000003"), str(tmp_path / "exported"), "--verifier", "org/model"]) == 0
    a, b = _state(out / "final"), _state(tmp_path / "exported")
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["speculators_config"]["verifier"]["name_or_path"] == "org/model"


@pytest.mark.slow
def test_resume_is_exact(llama_data: Path, llama_dir: Path, tmp_path: Path) -> None:
    """Stopped at step 2 of 4 and resumed == never stopped (bitwise on CPU), with accumulation and partitions."""
    common = {
        "model": {"target": str(llama_dir), "num_layers": 2, "num_depths": 3, "sequence_partitions": 2},
        "train": {
            "dtype": "fp32",
            "max_steps": 4,
            "grad_accum": 2,
            "micro_batch_size": 1,
            "save_every": 0,
            "progress": False,
            "tensorboard": False,
        },
    }
    full = _config(tmp_path, llama_data, llama_dir, "full", **common)
    split = _config(tmp_path, llama_data, llama_dir, "split", **common)
    r_full = train(load_config(full))
    assert not r_full.interrupted and r_full.step == 4
    r1 = train(load_config(split), stop_after=2)
    assert r1.interrupted and r1.step == 2 and r1.export_dir is None
    assert r1.checkpoint is not None and r1.checkpoint.name == "step-00000002"
    # a write killed mid-way leaves a .tmp directory: ignored, and removed by the next save
    partial = tmp_path / "split" / "step-00000003.tmp"
    (partial / "draft").mkdir(parents=True)
    (partial / "draft" / "model.safetensors").write_bytes(b"\0" * 100)
    r2 = train(load_config(split), resume="auto")
    assert not r2.interrupted and r2.step == 4 and not partial.exists()
    a, b = _state(tmp_path / "full" / "final"), _state(tmp_path / "split" / "final")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_partitions_and_accumulation_match_flat(llama_data: Path, llama_dir: Path, tmp_path: Path) -> None:
    """S=3 partitions + activation checkpointing, 2 micro-batches of 1 row == S=1, one micro-batch of 2 rows."""
    flat = _config(
        tmp_path,
        llama_data,
        llama_dir,
        "flat",
        model={"target": str(llama_dir), "num_layers": 2, "num_depths": 3},
        train={"max_steps": 2},
    )
    parts = _config(
        tmp_path,
        llama_data,
        llama_dir,
        "parts",
        model={
            "target": str(llama_dir),
            "num_layers": 2,
            "num_depths": 3,
            "sequence_partitions": 3,
            "activation_checkpointing": True,
        },
        train={"max_steps": 2, "micro_batch_size": 1, "grad_accum": 2},
    )
    train(load_config(flat))
    train(load_config(parts))
    a, b = _state(tmp_path / "flat" / "final"), _state(tmp_path / "parts" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_one_process_sums_each_partitioned_micro_batch_apart(
    llama_data: Path, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S=2, 2 micro-batches: the step gradient is G₀ + G₁, each micro-batch's units summed on their own.

    That is how 2 ranks × 1 micro-batch round it (the all-reduce adds each rank's sum), so one process
    matches them bit for bit; units summed straight into .grad, ((G₀ + u₀) + u₁) + c, do not.
    """
    import copy

    import peagle.run.train as train_mod
    from peagle.model.step import PEagleTrainer

    seen: dict[str, Any] = {"batches": [], "grads": None}
    units = PEagleTrainer.units

    def spy_units(self: PEagleTrainer, batch: Any, layout: Any = None) -> Any:
        if "initial" not in seen:  # before any backward: the draft the step starts from
            seen["initial"] = copy.deepcopy(self)
        seen["batches"].append(batch)
        return units(self, batch, layout)

    grad_norm = train_mod.grad_norm

    def spy_grad_norm(params: list[torch.Tensor], clip: float | None) -> float:
        if seen["grads"] is None:
            seen["grads"] = [p.grad.clone() for p in params]
        return grad_norm(params, clip)

    monkeypatch.setattr(PEagleTrainer, "units", spy_units)
    monkeypatch.setattr(train_mod, "grad_norm", spy_grad_norm)
    cfg = _config(
        tmp_path,
        llama_data,
        llama_dir,
        "parts",
        model={"target": str(llama_dir), "num_layers": 1, "num_depths": 3, "sequence_partitions": 2},
        train={"max_steps": 1, "micro_batch_size": 1, "grad_accum": 2},
    )
    train(load_config(cfg))
    ref: PEagleTrainer = seen["initial"]
    batches = seen["batches"][:2]
    normalizer = float(sum(ref.count_supervised(b) for b in batches))
    params = [p for p in ref.draft.parameters() if p.requires_grad]
    per_micro = []
    for batch in batches:
        for p in params:
            p.grad = None
        ref_units = list(ref.units(batch))
        assert len(ref_units) > 1
        for unit in ref_units:
            ref(unit, normalizer).loss.backward()
        per_micro.append([p.grad.clone() for p in params])
    want = [g0 + g1 for g0, g1 in zip(*per_micro, strict=True)]
    assert len(seen["grads"]) == len(want)
    for got, w in zip(seen["grads"], want, strict=True):
        assert torch.equal(got, w), float((got - w).abs().max())


@pytest.mark.slow
def test_offline_cache_mode(llama_dir: Path, chats: Path, tmp_path: Path) -> None:
    data = _prepare(llama_dir, chats, tmp_path / "prep", "--cache", str(tmp_path / "cache"), "--device", "cpu")
    assert (tmp_path / "cache" / "cache_manifest.json").is_file()
    cfg = _config(
        tmp_path,
        data,
        llama_dir,
        "offline",
        data={"dataset": str(data), "max_length": 96, "cache": str(tmp_path / "cache")},
        train={"max_steps": 2},
    )
    result = train(load_config(cfg))
    assert result.export_dir is not None and result.last_metrics["loss"] > 0


def test_offline_cache_never_loads_the_target_model(llama_dir: Path, chats: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """From a state cache the trainer reads only embeddings, final norm and lm_head (a 70B target's decoder
    never has to fit on a training rank): loading the whole model is made to fail, training still runs."""
    import transformers

    data = _prepare(llama_dir, chats, tmp_path / "prep", "--cache", str(tmp_path / "cache"), "--device", "cpu")
    cfg = _config(tmp_path, data, llama_dir, "parts", train={"max_steps": 2},
                  data={"dataset": str(data), "max_length": 96, "cache": str(tmp_path / "cache")})
    first = train(load_config(cfg)).last_metrics["loss"]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the whole target model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    cfg2 = _config(tmp_path, data, llama_dir, "parts2", train={"max_steps": 2},
                   data={"dataset": str(data), "max_length": 96, "cache": str(tmp_path / "cache")})
    assert train(load_config(cfg2)).last_metrics["loss"] == first


def test_validation_split_keeps_each_chat_on_one_side(llama_dir: Path, tmp_path: Path) -> None:
    """Examples of one chat (per-turn renderings) never straddle the train/val split; with one example per
    chat the split is the seeded example permutation it always was."""
    from types import SimpleNamespace

    from peagle.run.loader import TrainData

    groups = [[0, 1, 2], [3], [4, 5], [6], [7, 8, 9, 10], [11], [12], [13, 14], [15]]
    fake = SimpleNamespace(lengths=[8] * 16, record_groups=lambda: groups)
    cfg = load_config(_config(tmp_path, tmp_path, llama_dir, "split", data={"val_fraction": 0.25, "max_length": 64}))
    data = TrainData(cfg, fake, rows_per_step=1)
    val = set(data.val_ids)
    assert val and set(data.train_ids) == set(range(16)) - val
    for grp in groups:
        assert set(grp) <= val or not set(grp) & val, grp
    one_each = SimpleNamespace(lengths=[8] * 16, record_groups=lambda: [[i] for i in range(16)])
    data = TrainData(cfg, one_each, rows_per_step=1)
    g = torch.Generator().manual_seed(cfg.train.seed)
    assert data.val_ids == sorted(torch.randperm(16, generator=g).tolist()[:4])
