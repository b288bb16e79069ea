"""Atomic checkpoints: checksums, truncation/corruption refused, interrupted writes ignored, RNG state."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from peagle.store.checkpoint import (
    CheckpointError,
    TrainState,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def _save(root: Path, step: int, model, opt, keep_last: int | None = None) -> Path:
    state = TrainState(step=step, epoch=0, row_in_epoch=step * 4, rows_per_step=4, scheduler={"last_epoch": step})
    return save_checkpoint(
        root,
        state,
        model=model,
        optimizer=opt,
        rng_states=[capture_rng()],
        config={"a": 1},
        keep_last=keep_last,
    )


def test_roundtrip_weights_optimizer_state(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = _save(tmp_path, 3, model, opt)
    assert path.name == "step-00000003" and (path / "COMPLETE").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]  # no temporary left
    model2, opt2 = _model_and_opt(seed=1)
    state, rng = load_checkpoint(path, model=model2, optimizer=opt2)
    assert state.step == 3 and state.row_in_epoch == 12 and state.scheduler == {"last_epoch": 3}
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"])
    assert len(rng) == 1


def test_rng_roundtrip() -> None:
    state = capture_rng()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    restore_rng(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_truncated_checkpoint_refused_previous_kept(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    good = _save(tmp_path, 2, model, opt)
    bad = _save(tmp_path, 4, model, opt)
    weights = bad / "draft" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        resolve_resume("auto", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(good) in msg  # one line, names the good one
    with pytest.raises(CheckpointError, match="truncated"):
        resolve_resume(str(bad), tmp_path)
    assert good.is_dir() and bad.is_dir()  # nothing deleted
    assert resolve_resume(str(good), tmp_path) == good


def test_corrupt_bytes_refused(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    f = path / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(path)


def test_missing_marker_refused(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(path), tmp_path)


def test_auto_without_checkpoints_starts_fresh(tmp_path: Path) -> None:
    assert resolve_resume("auto", tmp_path / "nothing") is None


def test_leftover_tmp_ignored_and_cleaned(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    good = _save(tmp_path, 2, model, opt)
    partial = tmp_path / ".step-00000004.tmp-0123abcd"  # fsutil.atomic_dir's temporary
    legacy = tmp_path / "step-00000004.tmp"  # what peagle wrote before atomic_dir
    for d in (partial, legacy):
        (d / "draft").mkdir(parents=True)
        (d / "draft" / "model.safetensors").write_bytes(b"\0" * 10)
    aside = tmp_path / ".step-00000002.old-4567"  # a finished swap whose old copy was not yet removed
    aside.mkdir()
    other = tmp_path / ".final.tmp-89ab"  # not a checkpoint's: not touched
    other.mkdir()
    assert resolve_resume("auto", tmp_path) == good
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    _save(tmp_path, 4, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "step-00000002", "step-00000004"]
    verify_checkpoint(good)


def test_killed_between_the_renames_of_a_swap_restores_the_old(tmp_path: Path) -> None:
    """A run killed after moving an old step-N aside but before renaming the new one in keeps step-N."""
    model, opt = _model_and_opt()
    legacy = _save(tmp_path, 1, model, opt)
    good = _save(tmp_path, 2, model, opt)
    os.rename(good, tmp_path / ".step-00000002.old-feed")
    os.rename(legacy, tmp_path / "step-00000001.replaced")  # the same, as peagle wrote it before
    assert list_checkpoints(tmp_path) == []
    _save(tmp_path, 3, model, opt)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]
    verify_checkpoint(good)
    verify_checkpoint(legacy)


def test_same_step_of_an_abandoned_run_is_replaced(tmp_path: Path) -> None:
    model_a, opt_a = _model_and_opt(seed=0)
    model_b, opt_b = _model_and_opt(seed=1)
    _save(tmp_path, 2, model_a, opt_a)
    path = _save(tmp_path, 2, model_b, opt_b)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
    model_c, opt_c = _model_and_opt(seed=2)
    load_checkpoint(path, model=model_c, optimizer=opt_c)
    for b, c in zip(model_b.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(b, c)
    assert not torch.equal(next(model_a.parameters()), next(model_c.parameters()))


def _disk_full_on(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    real = torch.save

    def save(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if f"step-{step:08d}" in str(f) and str(f).endswith("rng.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def test_failed_write_one_message_previous_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _model_and_opt()
    good = _save(tmp_path, 2, model, opt)
    _disk_full_on(monkeypatch, 3)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 3, model, opt)
    assert str(err.value) == (
        f"cannot write checkpoint {tmp_path / 'step-00000003'}: disk full (No space left on device); "
        f"the previous checkpoints are intact (newest: {good})"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]  # the partial write is gone
    verify_checkpoint(good)


def test_failed_write_first_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _model_and_opt()
    _disk_full_on(monkeypatch, 1)
    with pytest.raises(CheckpointError, match=r"disk full \(No space left on device\); no earlier checkpoint exists$"):
        _save(tmp_path, 1, model, opt)
    assert list(tmp_path.iterdir()) == []


def test_failed_replacement_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _model_and_opt()
    old = _save(tmp_path, 2, model, opt)
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    _disk_full_on(monkeypatch, 2)
    with pytest.raises(CheckpointError, match="disk full"):
        _save(tmp_path, 2, model, opt)
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_skipped_steps_roundtrip(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    state = TrainState(step=5, skipped_steps=3)
    path = save_checkpoint(tmp_path, state, model=model, optimizer=opt, rng_states=[capture_rng()], config={})
    raw = json.loads((path / "trainer_state.json").read_text())
    assert raw["skipped_steps"] == 3 and "extra" not in raw
    assert load_checkpoint(path)[0].skipped_steps == 3


def test_older_trainer_state_with_extra_is_mapped(tmp_path: Path) -> None:
    """trainer_state.json written before ``skipped_steps`` kept the count in ``extra.nonfinite_skipped``."""
    model, opt = _model_and_opt()
    path = _save(tmp_path, 4, model, opt)
    f = path / "trainer_state.json"
    raw = json.loads(f.read_text())
    del raw["skipped_steps"]
    raw["extra"] = {"nonfinite_skipped": 2}
    f.write_text(json.dumps(raw))
    marker = json.loads((path / "COMPLETE").read_text())  # keep the checkpoint verifiable
    marker["files"]["trainer_state.json"] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                                             "bytes": f.stat().st_size}
    (path / "COMPLETE").write_text(json.dumps(marker))
    state, _ = load_checkpoint(path)
    assert state.skipped_steps == 2 and state.step == 4 and state.row_in_epoch == 16
    raw["extra"] = {}
    f.write_text(json.dumps(raw))
    assert load_checkpoint(path, verify=False)[0].skipped_steps == 0


@pytest.mark.slow
def test_sigkill_during_write_keeps_last_complete(tmp_path: Path) -> None:
    """A process SIGKILLed in the middle of writing a checkpoint leaves the previous one resumable."""
    script = textwrap.dedent(
        f"""
        import os, sys, time, torch
        import peagle.store.checkpoint as ck
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256)
        opt = torch.optim.AdamW(model.parameters())
        state = ck.TrainState(step=1)
        ck.save_checkpoint({str(tmp_path)!r}, state, model=model, optimizer=opt,
                           rng_states=[ck.capture_rng()], config={{}})
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            print("WRITING", flush=True)
            time.sleep(60)
        torch.save = slow_save
        state.step = 2
        ck.save_checkpoint({str(tmp_path)!r}, state, model=model, optimizer=opt,
                           rng_states=[ck.capture_rng()], config={{}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "WRITING" in line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (left,) = tmp_path.glob(".step-00000002.tmp-*")  # only atomic_dir's hidden temporary
    assert left.is_dir() and not (tmp_path / "step-00000002").exists()
    path = resolve_resume("auto", tmp_path)
    assert path is not None and path.name == "step-00000001"
    model = torch.nn.Linear(256, 256)
    state, _ = load_checkpoint(path, model=model)
    assert state.step == 1
