"""Every user error of `peagle prepare | train | eval | export | demo` is ONE line on stderr naming the
file, line, key or path and what was expected; exit status != 0; never a traceback.

Each row runs `python -m peagle.cli ...` as its own process (what a user runs), a few at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peagle.cli import main

GOOD = [
    {"messages": [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"}]},
    {"messages": [{"role": "user", "content": "sort: pear, fig"}, {"role": "assistant", "content": "fig, pear"}]},
] * 6


@pytest.fixture(scope="module")
def world(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the failing invocations point at: data, a prepared dataset, a finished run, prompts."""
    d = tmp_path_factory.mktemp("errors")
    good = d / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    (d / "malformed.jsonl").write_text(json.dumps(GOOD[0]) + "\n" + '{"messages": [\n' + json.dumps(GOOD[1]) + "\n")
    (d / "latin1.jsonl").write_bytes(
        (json.dumps(GOOD[0]) + "\n").encode()
        + b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}\n'
    )
    (d / "afile").write_text("not a directory\n")
    prompts = d / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "count from 2 to 6"}) + "\n")
    prep, prep_small = d / "prep", d / "prep_small"
    base = ["prepare", str(good), "--target", str(llama_dir), "--max-length", "64", "--no-progress"]
    assert main([*base, "--out", str(prep), "--draft-vocab-size", "128"]) == 0
    assert main([*base, "--out", str(prep_small), "--draft-vocab-size", "100"]) == 0
    cfg = {
        "data": {"dataset": str(prep), "max_length": 64},
        "model": {"target": str(llama_dir), "num_layers": 1, "num_depths": 2},
        "train": {"dtype": "fp32", "output_dir": str(d / "run"), "max_steps": 2, "save_every": 1, "progress": False,
                  "tensorboard": False},
    }
    (d / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(d / "train.yaml")]) == 0
    return {"d": d, "good": good, "prompts": prompts, "prep": prep, "prep_small": prep_small, "run": d / "run",
            "cfg": d / "train.yaml", "target": llama_dir, "afile": d / "afile"}


def _rows(w: dict[str, Path]) -> list[tuple[str, list[str], list[str]]]:
    d, t, cfg, run = w["d"], str(w["target"]), str(w["cfg"]), w["run"]
    prep = ["prepare", "--target", t, "--no-progress"]
    ev = ["eval", "--target", t, "--prompts", str(w["prompts"]), "--max-new-tokens", "4", "--no-progress"]
    return [
        # prepare
        ("prepare: malformed JSONL line", [*prep, str(d / "malformed.jsonl"), "--out", str(d / "o1")],
         [f"{d / 'malformed.jsonl'}:2"]),
        ("prepare: non-UTF-8 byte", [*prep, str(d / "latin1.jsonl"), "--out", str(d / "o2")],
         [f"{d / 'latin1.jsonl'}:2", "UTF-8"]),
        ("prepare: --out is a file", [*prep, str(w["good"]), "--out", str(w["afile"])], [str(w["afile"])]),
        ("prepare: --out under a file", [*prep, str(w["good"]), "--out", str(w["afile"] / "x")], [str(w["afile"])]),
        ("prepare: missing input", [*prep, str(d / "nope.jsonl"), "--out", str(d / "o3")], ["nope.jsonl"]),
        # train
        ("train: missing config", ["train", str(d / "nope.yaml")], ["config file not found", "nope.yaml"]),
        ("train: unknown key", ["train", cfg, "--optim.lrr", "1"], ["unknown option '--optim.lrr'", "optim.lr"]),
        ("train: output_dir is a file", ["train", cfg, "--train.output_dir", str(w["afile"])],
         ["train.output_dir", str(w["afile"]), "is a file, not a directory"]),
        ("train: output_dir under a file", ["train", cfg, "--train.output_dir", str(w["afile"] / "run")],
         ["train.output_dir", "which is a file"]),
        ("train: existing run without --resume", ["train", cfg], ["already holds checkpoints", "--resume auto"]),
        ("train: resume a missing checkpoint", ["train", cfg, "--resume", str(d / "nope")], ["checkpoint not found"]),
        ("train: resume with a changed K", ["train", cfg, "--resume", "auto", "--model.num_depths", "4"],
         ["model.num_depths 2 → 4", "cannot change on resume"]),
        ("train: resume with an unaccepted lr", ["train", cfg, "--resume", "auto", "--optim.lr", "1e-2"],
         ["optim.lr", "--accept-change optim.lr"]),
        ("train: accept an unknown key", ["train", cfg, "--resume", "auto", "--accept-change", "optim.lrr"],
         ["--accept-change", "optim.lrr"]),
        ("train: resume, dataset with another draft vocab",
         ["train", cfg, "--resume", "auto", "--train.output_dir", str(run), "--data.dataset", str(w["prep_small"])],
         ["data.dataset"]),
        # export
        ("export: into the run directory", ["export", str(run), str(run)], ["not a peagle export", "step-00000001/"]),
        ("export: into the target directory", ["export", str(run), t, "--overwrite"], ["a model directory"]),
        ("export: out is a file", ["export", str(run), str(w["afile"])], ["is a file, not a directory"]),
        ("export: out under a file", ["export", str(run), str(w["afile"] / "x")], ["which is a file"]),
        ("export: missing source", ["export", str(d / "nope"), str(d / "e1")], ["no such checkpoint"]),
        # eval
        ("eval: --out under a file", [*ev, "--draft", str(run), "--out", str(w["afile"] / "plots")],
         ["--out", "which is a file"]),
        ("eval: --json is a directory", [*ev, "--draft", str(run), "--json", str(d)], ["--json", "is a directory"]),
        ("eval: K above the trained K", [*ev, "--draft", str(run), "--num-speculative-tokens", "5"],
         ["exceeds the draft's trained K (2"]),
        ("eval: missing draft", [*ev, "--draft", str(d / "nope")], ["--draft", "nope"]),
        ("eval: missing prompts", ["eval", "--target", t, "--draft", str(run), "--prompts", str(d / "nope.jsonl"),
                                   "--no-progress"], ["nope.jsonl"]),
        # demo
        ("demo: --out is a file", ["demo", "--out", str(w["afile"]), "--quick", "--no-progress"],
         [str(w["afile"]), "not a directory"]),
    ]


@pytest.mark.slow
def test_every_user_error_is_one_line(world: dict[str, Path]) -> None:
    rows = _rows(world)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEAGLE_CACHE": str(world["d"] / "cache")}
    env.pop("PEAGLE_DEBUG", None)
    failures = []
    # train rows share one output dir: run one at a time (concurrent ones would meet its lock)
    batches = [[r] for r in rows if r[1][0] == "train"]
    others = [r for r in rows if r[1][0] != "train"]
    batches += [others[i : i + 4] for i in range(0, len(others), 4)]
    for batch in batches:
        procs = [subprocess.Popen([sys.executable, "-m", "peagle.cli", *argv], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _, argv, _ in batch]
        for (name, _, fragments), p in zip(batch, procs, strict=True):
            _, err = p.communicate(timeout=300)
            lines = err.strip().splitlines()
            problems = []
            if p.returncode == 0:
                problems.append("exit status 0")
            if "Traceback" in err:
                problems.append("a traceback")
            if len(lines) != 1:
                problems.append(f"{len(lines)} stderr lines")
            problems += [f"no {f!r}" for f in fragments if not any(f in ln for ln in lines[:1])]
            print(f"{name}: rc {p.returncode}: {lines[0] if lines else ''}")  # the table, with -s
            if problems:
                failures.append(f"{name}: {', '.join(problems)}\n    {err.strip()[-600:]}")
    assert not failures, "\n".join(failures)
    assert not (world["d"] / "o1").exists() and not (world["d"] / "e1").exists()


@pytest.mark.slow
def test_no_progress_silences_weight_loading_bars(world: dict[str, Path], tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "peagle.cli", "eval", "--target", str(world["target"]), "--draft",
            str(world["run"]), "--prompts", str(world["prompts"]), "--max-new-tokens", "4"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    env["OMP_NUM_THREADS"] = "1"
    loud = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    quiet = subprocess.run([*argv, "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "Loading weights" in loud.stderr  # the bar this flag must silence exists
    assert "it/s" not in quiet.stderr and "Loading weights" not in quiet.stderr, quiet.stderr
