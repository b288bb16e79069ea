"""Run safety: nothing peagle did not write is replaced, one run per output dir, non-finite steps never
checkpointed, resume refuses config changes it would not apply (and applies the accepted ones), full
disks, the training report, TensorBoard across a resume, eval of a run directory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peagle.cli import main
from peagle.config.training import load_config
from peagle.run.train import train
from peagle.store.checkpoint import verify_checkpoint

CHATS = [
    [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"}],
    [{"role": "user", "content": "sort these words: pear, apple, fig"},
     {"role": "assistant", "content": "apple, fig, pear"}],
    [{"role": "user", "content": "how many letters has apple?"},
     {"role": "assistant", "content": "The word apple has 5 letters: a-p-p-l-e."}],
    [{"role": "user", "content": "what is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
]


def _prepare(target: Path, chats: Path, out: Path, vocab: int) -> Path:
    argv = ["prepare", str(chats), "--target", str(target), "--out", str(out), "--max-length", "96",
            "--draft-vocab-size", str(vocab), "--no-progress"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("safety_data")
    (d / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 5))
    prompts = ("count from 2 to 6", "sort: fig")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in prompts))
    return d


@pytest.fixture(scope="module")
def prep128(llama_dir: Path, data_dir: Path) -> Path:
    return _prepare(llama_dir, data_dir / "chats.jsonl", data_dir / "prep128", 128)


@pytest.fixture(scope="module")
def prep100(llama_dir: Path, data_dir: Path) -> Path:
    return _prepare(llama_dir, data_dir / "chats.jsonl", data_dir / "prep100", 100)


def _config(tmp: Path, dataset: Path, target: Path, out: str = "run", **sections: dict[str, Any]) -> Path:
    cfg: dict[str, dict[str, Any]] = {
        "data": {"dataset": str(dataset), "max_length": 96},
        "model": {"target": str(target), "num_layers": 1, "num_depths": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "min_lr_ratio": 0.1},
        "train": {"dtype": "fp32", "output_dir": str(tmp / out), "micro_batch_size": 2, "grad_accum": 1, "max_steps": 3,
                  "save_every": 0, "progress": False, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peagle"), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(llama_dir: Path, prep128: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step run with validation and acceptance length measured at steps 2 and 3."""
    tmp = tmp_path_factory.mktemp("safety_run")
    cfg = _config(tmp, prep128, llama_dir, data={"val_fraction": 0.2},
                  train={"save_every": 1, "eval_every": 2},
                  eval={"prompts": str(data_dir / "prompts.jsonl"), "max_new_tokens": 4, "num_prompts": 2})
    assert main(["train", str(cfg)]) == 0
    return tmp / "run"


# -- export never deletes what peagle did not write ----------------------------------------------


def test_export_refuses_run_dir_and_model_dir(capsys, run_dir: Path, llama_dir: Path, tmp_path: Path) -> None:
    before = _tree_digest(run_dir)
    line = _one_error(capsys, ["export", str(run_dir), str(run_dir)], "is not empty and is not a peagle export",
                      "a peagle run directory with 3 checkpoint(s): final/, step-00000001/")
    assert "nothing was written" in line
    _one_error(capsys, ["export", str(run_dir), str(run_dir), "--overwrite"], "is not a peagle export")
    assert _tree_digest(run_dir) == before  # every checkpoint still there, byte for byte
    for step in (1, 2, 3):
        verify_checkpoint(run_dir / f"step-{step:08d}")

    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    before = _tree_digest(model)
    _one_error(capsys, ["export", str(run_dir), str(model), "--overwrite"], "is not a peagle export",
               "a model directory: ", "config.json")
    assert _tree_digest(model) == before


def test_export_overwrites_only_a_previous_export(capsys, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "draft"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _one_error(capsys, ["export", str(run_dir), str(out)], "already holds a peagle export", "--overwrite")
    assert main(["export", str(run_dir), str(out), "--overwrite", "--verifier", "org/other"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == "org/other"  # really replaced
    # a previous export the user added a file to is no longer only peagle's: never replaced
    (out / "README.md").write_text("my notes")
    _one_error(capsys, ["export", str(run_dir), str(out), "--overwrite"], "is not a peagle export", "README.md")
    assert (out / "README.md").read_text() == "my notes"
    # an empty directory is fine; a file, or a path under a file, is one clear line
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run_dir), str(tmp_path / "empty")]) == 0
    (tmp_path / "afile").write_text("x")
    _one_error(capsys, ["export", str(run_dir), str(tmp_path / "afile")], "is a file, not a directory")
    _one_error(capsys, ["export", str(run_dir), str(tmp_path / "afile" / "sub")], "which is a file")
    assert (tmp_path / "afile").read_text() == "x"


def test_fresh_train_refuses_foreign_output_dir(capsys, prep128: Path, llama_dir: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, prep128, llama_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    _one_error(capsys, ["train", str(cfg)], "not a peagle run directory", "notes.txt")
    (run / "notes.txt").unlink()
    (run / "final").mkdir()
    (run / "final" / "weights.bin").write_text("mine")
    _one_error(capsys, ["train", str(cfg)], "final", "is not a peagle export", "weights.bin")
    assert (run / "final" / "weights.bin").read_text() == "mine"
    assert not list(run.glob("step-*")) and not (run / "metrics.jsonl").exists()


# -- the report and eval of a run directory ----------------------------------------------------------


def test_train_writes_report_and_plots(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    for png in ("loss.png", "depth_accuracy.png", "al_during_training.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
        assert f"]({png})" in report
    assert "## Validation during training" in report
    val = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [r["step"] for r in val] == [2, 3]
    # the table lists the measured AL of each validation, as metrics.jsonl holds it
    for r in val:
        assert f"| {r['step']} | {r['loss']:.4f} |" in report and f"{r['al_k1']:.3f}" in report
    assert "3 of 3 optimizer steps" in report and "K = 3" in report


def test_eval_accepts_a_run_directory(run_dir: Path, llama_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    common = ["eval", "--target", str(llama_dir), "--prompts", str(data_dir / "prompts.jsonl"),
              "--max-new-tokens", "4", "--no-progress"]
    assert main([*common, "--draft", str(run_dir), "--json", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--draft", str(run_dir / "final"), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["num_speculative_tokens"] == 3  # the trained K
    assert a["acceptance_length"] == b["acceptance_length"]  # the run's newest checkpoint == its final export


# -- one run per output directory --------------------------------------------------------------------


@pytest.mark.slow
def test_second_run_on_locked_dir_refuses(prep128: Path, llama_dir: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, prep128, llama_dir, train={"max_steps": 100000})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "peagle.cli", "train", str(cfg)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                break
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()
        second = subprocess.run([*cmd, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert "is in use by another peagle run" in lines[0] and f"pid {first.pid} on " in lines[0], lines[0]
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err  # the holder was not disturbed: it saved and exited normally
    (ckpt,) = sorted((tmp_path / "run").glob("step-*"))
    verify_checkpoint(ckpt)
    step = int(ckpt.name.split("-")[1])
    # the lock died with its holder: the run continues
    assert main(["train", str(cfg), "--resume", "auto", "--train.max_steps", str(step + 1)]) == 0


def test_lock_names_holder_in_process(prep128: Path, llama_dir: Path, tmp_path: Path) -> None:
    """The lock is a kernel lock: held by another process (even an idle one), refused; released, fine."""
    from peagle.store.rundir import RunLock, RunLockError

    run = tmp_path / "run"
    code = ("import sys, time; from peagle.store.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=f"pid {holder.pid} on "):
            RunLock(run).acquire()
        with pytest.raises(RunLockError, match="in use"):
            train(load_config(_config(tmp_path, prep128, llama_dir)))
    finally:
        holder.kill()
        holder.wait()
    RunLock(run).acquire().release()  # the dead holder's lock is gone


# -- non-finite loss ---------------------------------------------------------------------------------


def _nan_at_step(monkeypatch: pytest.MonkeyPatch, bad_step: int) -> None:
    """The loss of the ``bad_step``-th training forward (one forward per step here) becomes NaN."""
    from peagle.model.step import PEagleTrainer, StepOutput

    orig = PEagleTrainer.forward
    calls = {"n": 0}

    def forward(self, unit, normalizer=None):  # noqa: ANN001, ANN202
        out = orig(self, unit, normalizer)
        if self.training:
            calls["n"] += 1
            if calls["n"] == bad_step:
                return StepOutput(out.loss * float("nan"), out.metrics)
        return out

    monkeypatch.setattr(PEagleTrainer, "forward", forward)


def test_nonfinite_loss_stops_before_saving(
    capsys, monkeypatch, prep128: Path, llama_dir: Path, tmp_path: Path
) -> None:
    _nan_at_step(monkeypatch, 3)
    cfg = _config(tmp_path, prep128, llama_dir, train={"max_steps": 5, "save_every": 1, "keep_last": 2})
    line = _one_error(capsys, ["train", str(cfg)], "non-finite loss (nan) at step 3", "train.on_nonfinite: skip",
                      "step-00000002")
    assert "nothing of it was saved" in line
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000001", "step-00000002"]
    for p in run.glob("step-*"):
        verify_checkpoint(p)
    assert not (run / "final").exists()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_nonfinite_loss_skip_mode(capsys, monkeypatch, prep128: Path, llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _nan_at_step(monkeypatch, 3)
    cfg = _config(tmp_path, prep128, llama_dir,
                  train={"max_steps": 4, "save_every": 1, "keep_last": 10, "on_nonfinite": "skip"})
    result = train(load_config(cfg))
    assert not result.interrupted and result.step == 4 and result.skipped_steps == 1
    assert "step 3: non-finite loss (nan): skipped (no optimizer update; 1 skipped so far)" in capsys.readouterr().out
    run = tmp_path / "run"
    w = {s: load_file(str(run / f"step-{s:08d}" / "draft" / "model.safetensors")) for s in (2, 3, 4)}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])  # the skipped step changed nothing
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])  # and training went on
    assert all(torch.isfinite(v.float()).all() for v in w[4].values())
    opt = {s: torch.load(run / f"step-{s:08d}" / "optimizer.pt", weights_only=True) for s in (3, 4)}
    adam_steps = {s: {float(v["step"]) for v in o["state"].values()} for s, o in opt.items()}
    assert adam_steps == {3: {2.0}, 4: {3.0}}  # AdamW took no step for the skipped one
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, False, True, False]
    assert json.loads((run / "step-00000004" / "trainer_state.json").read_text())["skipped_steps"] == 1
    assert "1 step(s) skipped" in (run / "report.md").read_text()


# -- resume: refuse what would not be applied, apply what is accepted ----------------------------------


def test_resume_refuses_changed_config(capsys, prep128: Path, llama_dir: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, prep128, llama_dir, train={"max_steps": 4})
    r = train(load_config(cfg), stop_after=2)
    assert r.interrupted and r.step == 2
    capsys.readouterr()
    resume = ["train", str(cfg), "--resume", "auto"]
    line = _one_error(capsys, [*resume, "--optim.lr", "1e-3", "--model.num_depths", "4"],
                      "differs from the checkpoint's", "optim.lr 0.003 → 0.001",
                      "model.num_depths 3 → 4 (cannot change on resume", "--accept-change optim.lr",
                      "restore model.num_depths")
    assert "--accept-change model.num_depths" not in line
    _one_error(capsys, [*resume, "--model.num_depths", "4", "--accept-change", "model.num_depths"],
               "--accept-change model.num_depths: model.num_depths cannot change on resume")
    _one_error(capsys, [*resume, "--accept-change", "optim.lrr"], "unknown key 'optim.lrr'", "did you mean 'optim.lr'")
    _one_error(capsys, [*resume, "--data.max_length", "80"], "data.max_length 96 → 80", "cannot change on resume")
    # nothing ran: the checkpoint is still the newest, config.yaml still the old one
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-00000002"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 3e-3


def test_accepted_lr_change_takes_effect(capsys, monkeypatch, prep128: Path, llama_dir: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, prep128, llama_dir, train={"max_steps": 4})
    train(load_config(cfg), stop_after=2)
    capsys.readouterr()
    used: list[list[tuple[float, float]]] = []
    orig = torch.optim.AdamW.step

    def step(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        used.append([(g["lr"], g["weight_decay"]) for g in self.param_groups])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    argv = ["train", str(cfg), "--resume", "auto", "--optim.lr", "1e-3", "--optim.weight_decay", "0.05",
            "--accept-change", "optim.lr,optim.weight_decay"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # warmup 1, 4 steps, floor 0.1: cosine factor 0.775 at step 3 (index 2) and 0.325 at step 4
    assert len(used) == 2 and len(used[0]) == 2
    for groups, factor in zip(used, (0.775, 0.325), strict=True):
        assert [lr for lr, _ in groups] == pytest.approx([1e-3 * factor] * 2, rel=1e-12)
        assert [wd for _, wd in groups] == [0.05, 0.0]  # decay group / no-decay group
    assert "config change applied from step 3: optim.lr 0.003 → 0.001" in out
    assert "lr of step 3: 0.000775 (optim.lr 0.001" in out
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[2]["lr"] == pytest.approx(7.75e-4, rel=1e-12) and recs[1]["lr"] == pytest.approx(3e-3, rel=1e-12)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 1e-3


def test_resume_with_another_draft_vocabulary(capsys, prep128: Path, prep100: Path, llama_dir: Path,
                                              tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(prep128, data)
    cfg = _config(tmp_path, data, llama_dir, train={"max_steps": 3})
    train(load_config(cfg), stop_after=1)
    shutil.rmtree(data)
    shutil.copytree(prep100, data)  # the same path, prepared again with another draft vocabulary
    capsys.readouterr()
    _one_error(capsys, ["train", str(cfg), "--resume", "auto"], "draft vocabulary of 128 tokens",
               f"data.dataset {data} gives 100", "resume with the dataset it was trained on")


def test_full_disk_during_checkpoint(capsys, monkeypatch, prep128: Path, llama_dir: Path, tmp_path: Path) -> None:
    orig = torch.save

    def save(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "step-00000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    cfg = _config(tmp_path, prep128, llama_dir, train={"save_every": 1, "keep_last": 1})
    run = tmp_path / "run"
    _one_error(capsys, ["train", str(cfg)], f"cannot write checkpoint {run / 'step-00000002'}: disk full",
               f"the previous checkpoints are intact (newest: {run / 'step-00000001'})")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-00000001"]
    verify_checkpoint(run / "step-00000001")


# -- TensorBoard across a resume -----------------------------------------------------------------------


def test_tensorboard_keeps_resumed_step(prep128: Path, llama_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config(tmp_path, prep128, llama_dir, train={"max_steps": 4, "tensorboard": True})
    train(load_config(cfg), stop_after=2)
    train(load_config(cfg), resume="auto")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
