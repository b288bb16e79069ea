"""`train_step` on its own: one optimizer step of a built `Run`, checked against a step written out by hand."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peagle.config.training import load_config
from peagle.data import prepare, shift_states
from peagle.run.build import Run, build
from peagle.run.train import NonFiniteError, _with_last, train_step
from peagle.target.hf import embedding_rows

CHATS = [
    [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"}],
    [{"role": "user", "content": "what is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19"}],
    [{"role": "user", "content": "sort: pear, apple, fig"}, {"role": "assistant", "content": "apple, fig, pear"}],
    [{"role": "user", "content": "capital of France?"}, {"role": "assistant", "content": "Paris, on the Seine."}],
]


@pytest.fixture(scope="module")
def dataset(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("step_data")
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 4))
    prepare(chats, llama_dir, root / "prep", max_length=64, draft_vocab_size=128, vocab_size=embedding_rows(llama_dir),
            progress=False)
    return root / "prep"


def _run(tmp: Path, dataset: Path, target: Path, name: str, **train: Any) -> Run:
    cfg = {
        "data": {"dataset": str(dataset), "max_length": 64},
        "model": {"target": str(target), "num_layers": 1, "num_depths": 3, **train.pop("model", {})},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.5},
        "train": {"dtype": "fp32", "output_dir": str(tmp / name), "micro_batch_size": 1, "grad_accum": 2,
                  "max_steps": 4, "save_every": 0, "progress": False, "tensorboard": False, **train},
        "eval": {"enabled": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return build(load_config(path))


def _hand_gradient(run: Run, epoch: int, row: int, per_depth: bool = False) -> dict[str, torch.Tensor]:
    """The step's gradient as the docs describe it, on a copy: one normaliser for the whole step (all
    micro-batches' supervised COD elements), every unit's KL sum / normaliser backpropagated; ``per_depth``
    (loss_normalization "depths"): an element of depth d divided by K × the step's depth-d count instead."""
    trainer = copy.deepcopy(run.trainer)
    micro = [run.data.micro_batch(rows, epoch) for rows in run.data.step_micro_rows(epoch, row, 0, 1)]
    batches = [shift_states(m.batch, *run.source.states(m.packed)) for m in micro]
    normalizer = float(sum(trainer.count_supervised(b) for b in batches))
    if per_depth:
        k = trainer.num_depths
        depths = [d for b in batches for lay in [trainer.layout(b)] for d in lay.depth[lay.supervised].tolist()]
        assert len(depths) == normalizer and set(depths) == set(range(k))
        normalizer = tuple(float(k * depths.count(d)) for d in range(k))
    for b in batches:
        for unit in trainer.units(b):
            trainer(unit, normalizer).loss.backward()
    return {n: p.grad.clone() for n, p in trainer.draft.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("partitions", "norm"), [(1, "elements"), (2, "elements"), (1, "depths"), (2, "depths")])
def test_one_step_is_the_hand_written_step(llama_dir: Path, dataset: Path, tmp_path: Path, partitions: int, norm: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import peagle.run.train as train_mod

    run = _run(tmp_path, dataset, llama_dir, f"s{partitions}{norm}",
               model={"sequence_partitions": partitions, "loss_normalization": norm})
    epoch, row = next(iter(run.data.positions(run.state, run.total)))
    want = _hand_gradient(run, epoch, row, per_depth=norm == "depths")
    seen: dict[str, Any] = {}
    grad_norm = train_mod.grad_norm

    def spy(params: list[torch.Tensor], clip: float | None) -> float:  # the gradient the update is made from
        seen["grads"] = {n: p.grad.clone() for n, p in run.draft.named_parameters() if p.grad is not None}
        seen["clip"] = clip
        return grad_norm(params, clip)

    monkeypatch.setattr(train_mod, "grad_norm", spy)
    before = {n: p.detach().clone() for n, p in run.draft.named_parameters()}
    record = train_step(run, epoch, row)
    assert seen["grads"].keys() == want.keys() and seen["clip"] == 0.5
    for name, w in want.items():
        torch.testing.assert_close(seen["grads"][name], w, rtol=1e-5, atol=1e-8, msg=name)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in want.values()]))
    assert record["grad_norm"] == pytest.approx(float(total), rel=1e-5)  # the norm before clipping
    assert all(not torch.equal(p, before[n]) for n, p in run.draft.named_parameters() if n in want)  # AdamW stepped
    assert record["step"] == 1 and run.state.step == 1 and not record["skipped"]
    # the data position moved by one step's rows; tokens = the real (non-padding) tokens of those rows
    assert (run.state.epoch, run.state.row_in_epoch) == run.data.advance(epoch, row)
    rows = [r for mb in run.data.step_micro_rows(epoch, row, 0, 1) for r in mb]
    assert record["tokens"] == sum(len(run.data.prepared[i]["input_ids"]) for r in rows for i in r)
    assert 0.0 <= record["acc"] <= 1.0 and record["loss"] > 0 and record["supervised"] > 0


def test_the_count_comes_from_the_layout_the_forward_uses(llama_dir: Path, dataset: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """COD is sampled once per micro-batch: the normaliser every forward divides by is the sum of the very
    layouts the units then run (not a second sample)."""
    run = _run(tmp_path, dataset, llama_dir, "count")
    layouts, normalizers = [], []
    orig_layout, orig_units = type(run.trainer).layout, type(run.trainer).units

    def layout(self: Any, batch: Any) -> Any:
        lay = orig_layout(self, batch)
        layouts.append(lay)
        return lay

    def units(self: Any, batch: Any, lay: Any = None) -> Any:
        assert lay is not None and any(lay is seen for seen in layouts)  # the counted layout, not a new one
        return orig_units(self, batch, lay)

    monkeypatch.setattr(type(run.trainer), "layout", layout)
    monkeypatch.setattr(type(run.trainer), "units", units)
    orig_forward = type(run.trainer).forward
    monkeypatch.setattr(type(run.trainer), "forward",
                        lambda self, unit, normalizer=None: normalizers.append(normalizer) or orig_forward(self, unit,
                                                                                                          normalizer))
    epoch, row = next(iter(run.data.positions(run.state, run.total)))
    train_step(run, epoch, row)
    assert len(layouts) == run.cfg.train.grad_accum
    assert set(normalizers) == {float(sum(lay.supervised_count for lay in layouts))}


def test_a_nonfinite_step_changes_nothing(llama_dir: Path, dataset: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, dataset, llama_dir, "nan")
    before = {n: p.detach().clone() for n, p in run.draft.named_parameters()}
    states = run.source.states
    run.source.states = lambda packed: tuple(t * float("nan") for t in states(packed))
    epoch, row = next(iter(run.data.positions(run.state, run.total)))
    with pytest.raises(NonFiniteError, match="non-finite .* at step 1 .* nothing of it was saved"):
        train_step(run, epoch, row)
    assert run.state.step == 0
    for n, p in run.draft.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_with_last_marks_only_the_last_item(n: int) -> None:
    got = list(_with_last(iter(range(n))))
    assert got == [(i, i == n - 1) for i in range(n)]


def test_a_steps_rows_do_not_depend_on_the_split(llama_dir: Path, dataset: Path, tmp_path: Path) -> None:
    """W ranks × A micro-batches × mb rows: micro-batch j of rank r holds rows [(j·W + r)·mb, …) of the step,
    so every split of the same G rows covers the same rows, each once."""
    run = _run(tmp_path, dataset, llama_dir, "rows", micro_batch_size=1, grad_accum=4)
    data = run.data
    epoch, row = next(iter(data.positions(run.state, run.total)))
    step_rows = data.epoch_rows(epoch)[row:row + data.rows_per_step]
    one = [r for mb in data.step_micro_rows(epoch, row, 0, 1) for r in mb]
    assert one == step_rows
    data.cfg.train.grad_accum = 2  # the same 4 rows as 2 ranks × 2 micro-batches
    two = [data.step_micro_rows(epoch, row, rank, 2) for rank in (0, 1)]
    assert two[0] == [[step_rows[0]], [step_rows[2]]] and two[1] == [[step_rows[1]], [step_rows[3]]]
    assert data.advance(epoch, row) == (epoch, row + 4) or data.advance(epoch, row) == (epoch + 1, 0)


@pytest.mark.parametrize(("partitions", "norm"), [(1, "elements"), (2, "elements"), (1, "depths")])
def test_a_bf16_step_is_the_fp32_step_to_bf16_rounding(llama_dir: Path, dataset: Path, tmp_path: Path,
                                                       partitions: int, norm: str) -> None:
    """train.dtype bf16 (autocast, fp32 master weights and AdamW state) through the built run, online
    target: the loss and update of fp32's within bf16 rounding (test_bf16.py explains the bounds)."""
    records, deltas = {}, {}
    for dtype in ("fp32", "bf16"):
        run = _run(tmp_path, dataset, llama_dir, f"{dtype}{partitions}{norm}", dtype=dtype,
                   model={"sequence_partitions": partitions, "loss_normalization": norm})
        assert run.autocast_bf16 == (dtype == "bf16") and run.state.autocast_dtype == dtype
        before = {n: p.detach().clone() for n, p in run.draft.named_parameters()}
        epoch, row = next(iter(run.data.positions(run.state, run.total)))
        records[dtype] = train_step(run, epoch, row)
        assert all(p.dtype == torch.float32 for p in run.draft.parameters())
        deltas[dtype] = torch.cat([(p.detach() - before[n]).flatten() for n, p in run.draft.named_parameters()])
    assert records["bf16"]["loss"] == pytest.approx(records["fp32"]["loss"], rel=2e-2)
    assert records["bf16"]["grad_norm"] == pytest.approx(records["fp32"]["grad_norm"], rel=5e-2)
    assert torch.nn.functional.cosine_similarity(deltas["bf16"], deltas["fp32"], dim=0) > 0.98


def test_auto_dtype_is_measured_once_and_kept_on_resume(llama_dir: Path, dataset: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import peagle.run.build as build_mod
    from peagle.run.distributed import Dist

    monkeypatch.setattr(build_mod, "bf16_speedup", lambda: 3.2)
    run = _run(tmp_path, dataset, llama_dir, "auto_fast", dtype="auto")
    assert run.autocast_bf16 and run.state.autocast_dtype == "bf16"
    assert "train.dtype auto: bf16 (bf16 matmul measured 3.2x fp32 on this CPU)" in capsys.readouterr().out
    monkeypatch.setattr(build_mod, "bf16_speedup", lambda: 0.4)  # an AVX2-only CPU emulates bf16
    run = _run(tmp_path, dataset, llama_dir, "auto_slow", dtype="auto")
    assert not run.autocast_bf16 and run.state.autocast_dtype == "fp32"
    cpu = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), initialized_here=False)
    assert build_mod._autocast_dtype("auto", cpu, "bf16") == ("bf16", "as when the run started")
    assert build_mod._autocast_dtype("fp32", cpu, "bf16") == ("fp32", "as configured")
