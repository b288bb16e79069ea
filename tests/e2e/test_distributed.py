"""2-process torchrun (gloo, CPU) == 1 process with twice the accumulation, after 3 optimizer steps; the
helpers that run and compare such runs (tests/e2e/test_fsdp.py uses them too)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peagle.cli import main

CHATS = [
    [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"}],
    [{"role": "user", "content": "what is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19"}],
    [
        {"role": "user", "content": "sort these words: pear, apple, fig"},
        {"role": "assistant", "content": "apple, fig, pear"},
    ],
    [
        {"role": "user", "content": "how many letters has apple?"},
        {"role": "assistant", "content": "The word apple has 5 letters: a-p-p-l-e."},
    ],
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_chats(tmp: Path, target: Path) -> Path:
    """The CHATS (x6) prepared for ``target`` (draft vocabulary 128) in ``tmp/prep``."""
    chats = tmp / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 6))
    data = tmp / "prep"
    argv = ["prepare", str(chats), "--target", str(target), "--out", str(data), "--max-length", "64",
            "--draft-vocab-size", "128", "--no-progress"]
    assert main(argv) == 0
    return data


def write_config(tmp: Path, dataset: Path, target: Path, name: str, grad_accum: int, partitions: int,
                 **sections: dict[str, Any]) -> Path:
    """``tmp/NAME.yaml``: a 1-layer draft, 3 steps of ``grad_accum`` micro-batches of one row, fp32, output
    ``tmp/NAME``; ``sections`` update it (``train={"parallel": "fsdp"}``)."""
    cfg: dict[str, dict[str, Any]] = {
        "data": {"dataset": str(dataset), "max_length": 64},
        "model": {"target": str(target), "num_layers": 1, "num_depths": 3, "sequence_partitions": partitions},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {
            "dtype": "fp32",
            "output_dir": str(tmp / name),
            "micro_batch_size": 1,
            "grad_accum": grad_accum,
            "max_steps": 3,
            "save_every": 0,
            "progress": False,
            "tensorboard": False,
        },
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(*args: str, script: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``peagle ARGS`` (or ``python SCRIPT ARGS``) in 2 CPU processes (torchrun, gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *([str(script)] if script else ["-m", "peagle.cli"]), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run: Path, split: str = "train") -> list[dict[str, Any]]:
    """The ``split`` records of ``run``'s metrics.jsonl."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("split", "train") == split]


def assert_same_training(one: Path, two: Path) -> None:
    """Two runs took the same steps: equal supervised counts and tokens, losses (and validation) and final
    weights equal to fp32 rounding."""
    from peagle.model.draft import PEagleDraft

    a = PEagleDraft.from_pretrained(one / "final").state_dict()
    b = PEagleDraft.from_pretrained(two / "final").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the same global supervised counts and losses were logged (rank 0 logs the all-reduced sums)
    la, lb = metrics(one), metrics(two)
    assert [r["supervised"] for r in la] == [r["supervised"] for r in lb]
    assert [r["tokens"] for r in la] == [r["tokens"] for r in lb]
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    for ra, rb in zip(metrics(one, "val"), metrics(two, "val"), strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == (rb[k] if isinstance(rb[k], str) else pytest.approx(rb[k], rel=1e-5, abs=1e-7)), k


@pytest.mark.slow
@pytest.mark.parametrize("partitions", [1, 2])
def test_two_ranks_equal_one_rank_with_double_accumulation(llama_dir: Path, tmp_path: Path, partitions: int) -> None:
    data = prepare_chats(tmp_path, llama_dir)
    one = write_config(tmp_path, data, llama_dir, "one", grad_accum=2, partitions=partitions)
    two = write_config(tmp_path, data, llama_dir, "two", grad_accum=1, partitions=partitions)
    assert main(["train", str(one)]) == 0
    torchrun("train", str(two))
    assert_same_training(tmp_path / "one", tmp_path / "two")
    # only rank 0 wrote checkpoints and the export
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("step-")) == ["step-00000003"]
