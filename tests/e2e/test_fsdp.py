"""FSDP2 (``train.parallel: fsdp``) over 2 CPU processes (torchrun, gloo): the steps of one process with twice
the accumulation (sequence partitions, validation and acceptance during training included), an exact resume
after every rank is SIGKILLed mid-run, and checkpoints and exports in DDP's format (a DDP run resumes one)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_distributed import assert_same_training, metrics, prepare_chats, torchrun, write_config

from peagle.cli import main
from peagle.store.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY, KILL_AT = 4, 2, 3  # killed before step 4: the checkpoint of step 2 is the newest

# every rank SIGKILLs itself when about to run step KILL_AT + 1 (after step 2's checkpoint and an unsaved step 3)
KILLER = f"""
import os, signal, sys
import peagle.run.train as loop
step = loop.train_step
def killed(run, epoch, row):
    if run.state.step == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(run, epoch, row)
loop.train_step = killed
from peagle.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _config(tmp: Path, data: Path, target: Path, name: str, grad_accum: int = 1, parallel: str = "fsdp",
            partitions: int = 2, **train: int) -> Path:
    """Validation rows (5: 3 on rank 0, 2 on rank 1) and acceptance every 2 steps, a checkpoint every 2."""
    return write_config(tmp, data, target, name, grad_accum=grad_accum, partitions=partitions,
                        data={"val_fraction": 0.25}, train={"parallel": parallel, "max_steps": STEPS,
                                                            "save_every": SAVE_EVERY, "eval_every": 2, **train})


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")} for r in records]


@pytest.fixture(scope="module")
def runs(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fsdp/``: an uninterrupted FSDP run; ``killed/``: the same config, every rank SIGKILLed before step
    4; ``killed-ddp/``: a copy of it (to resume under DDP)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = prepare_chats(tmp, llama_dir)
    whole = torchrun("train", str(_config(tmp, data, llama_dir, "fsdp")))
    assert "train.parallel fsdp: FSDP2 over 2 ranks" in whole.stdout
    (tmp / "killer.py").write_text(KILLER)
    killed = torchrun("train", str(_config(tmp, data, llama_dir, "killed")), script=tmp / "killer.py", check=False)
    assert killed.returncode != 0 and "(SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    shutil.copytree(tmp / "killed", tmp / "killed-ddp")
    return tmp


def test_fsdp_equals_one_process_with_double_accumulation(runs: Path, llama_dir: Path) -> None:
    one = _config(runs, runs / "prep", llama_dir, "one", grad_accum=2, parallel="ddp")  # one process: no wrapping
    assert main(["train", str(one)]) == 0
    assert_same_training(runs / "one", runs / "fsdp")
    assert [r["step"] for r in metrics(runs / "fsdp", "val")] == [2, 4]
    assert all(r["acceptance_length"] >= 1.0 for r in metrics(runs / "fsdp", "val"))
    # one checkpoint layout: the same files, the AdamW state keyed by parameter index as a plain run's
    a, b = runs / "one" / "step-00000004", runs / "fsdp" / "step-00000004"
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*"))
    sa, sb = (torch.load(c / "optimizer.pt", weights_only=True) for c in (a, b))
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa["state"][i][k], sb["state"][i][k], rtol=1e-4, atol=1e-7)


def test_sigkill_then_resume_auto_is_exact(runs: Path, llama_dir: Path) -> None:
    killed = runs / "killed"
    assert [s for s, _ in list_checkpoints(killed)] == [SAVE_EVERY] and not (killed / "final").exists()
    assert [r["step"] for r in metrics(killed)] == [1, 2, 3]  # step 3 ran, unsaved
    torchrun("train", str(runs / "killed.yaml"), "--resume", "auto")
    assert _untimed(metrics(killed)) == _untimed(metrics(runs / "fsdp"))  # bit for bit
    assert metrics(killed, "val") == metrics(runs / "fsdp", "val")
    for name in ("model.safetensors", "config.json"):
        assert (killed / "final" / name).read_bytes() == (runs / "fsdp" / "final" / name).read_bytes()


def test_export_is_ddps_and_ddp_resumes_an_fsdp_checkpoint(runs: Path, llama_dir: Path, tmp_path: Path) -> None:
    # the run's export == `peagle export` of its last checkpoint (a plain draft: what DDP exports), byte for byte
    assert main(["export", str(runs / "fsdp" / "step-00000004"), str(tmp_path / "export")]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "export" / name).read_bytes() == (runs / "fsdp" / "final" / name).read_bytes()
    # the killed FSDP run continued under DDP (train.parallel may change on resume): the same steps
    cfg = _config(runs, runs / "prep", llama_dir, "killed-ddp", parallel="ddp")
    resumed = torchrun("train", str(cfg), "--resume", "auto")
    assert "config change applied from step 3: train.parallel fsdp → ddp" in resumed.stdout
    assert_same_training(runs / "killed-ddp", runs / "fsdp")


def test_flat_steps_with_accumulation_equal_one_process(runs: Path, llama_dir: Path) -> None:
    """Without partitions (layers released after each forward) and 2 micro-batches per rank (gradient sync
    off for the first): 2 ranks x 2 == 1 process x 4, validation (unequal shares per rank) included."""
    flat = {"partitions": 1, "max_steps": 3, "save_every": 0, "eval_every": 0}
    torchrun("train", str(_config(runs, runs / "prep", llama_dir, "flat-fsdp", grad_accum=2, **flat)))
    assert main(["train", str(_config(runs, runs / "prep", llama_dir, "flat-one", grad_accum=4, **flat))]) == 0
    assert_same_training(runs / "flat-one", runs / "flat-fsdp")
    assert [r["step"] for r in metrics(runs / "flat-fsdp", "val")] == [3]
