"""Atomic checkpoints: checksums, truncation/corruption refused, interrupted writes ignored, RNG state."""

from __future__ import annotations

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

from peagle.checkpoint import (
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
    assert not list(tmp_path.glob("*.tmp"))
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
    partial = tmp_path / "step-00000004.tmp"
    (partial / "draft").mkdir(parents=True)
    (partial / "draft" / "model.safetensors").write_bytes(b"\0" * 10)
    assert resolve_resume("auto", tmp_path) == good
    _save(tmp_path, 4, model, opt)
    assert not partial.exists()


@pytest.mark.slow
def test_sigkill_during_write_keeps_last_complete(tmp_path: Path) -> None:
    """A process SIGKILLed in the middle of writing a checkpoint leaves the previous one resumable."""
    script = textwrap.dedent(
        f"""
        import os, sys, time, torch
        import peagle.checkpoint as ck
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
    assert (tmp_path / "step-00000002.tmp").is_dir()
    path = resolve_resume("auto", tmp_path)
    assert path is not None and path.name == "step-00000001"
    model = torch.nn.Linear(256, 256)
    state, _ = load_checkpoint(path, model=model)
    assert state.step == 1
