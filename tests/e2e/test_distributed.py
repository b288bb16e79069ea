"""2-process torchrun (gloo, CPU) == 1 process with twice the accumulation, after 3 optimizer steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def _config(tmp: Path, data: Path, target: Path, name: str, grad_accum: int, partitions: int) -> Path:
    cfg = {
        "data": {"dataset": str(data), "max_length": 64},
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
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("partitions", [1, 2])
def test_two_ranks_equal_one_rank_with_double_accumulation(llama_dir: Path, tmp_path: Path, partitions: int) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 6))
    data = tmp_path / "prep"
    assert (
        main(
            [
                "prepare",
                str(chats),
                "--target",
                str(llama_dir),
                "--out",
                str(data),
                "--max-length",
                "64",
                "--draft-vocab-size",
                "128",
                "--no-progress",
            ]
        )
        == 0
    )
    one = _config(tmp_path, data, llama_dir, "one", grad_accum=2, partitions=partitions)
    two = _config(tmp_path, data, llama_dir, "two", grad_accum=1, partitions=partitions)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert main(["train", str(one)]) == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "peagle.cli",
        "train",
        str(two),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from peagle.model.draft import PEagleDraft

    a = PEagleDraft.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = PEagleDraft.from_pretrained(tmp_path / "two" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the same global supervised counts and losses were logged (rank 0 logs the all-reduced sums)
    la = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["supervised"] for r in la] == [r["supervised"] for r in lb]
    assert [r["tokens"] for r in la] == [r["tokens"] for r in lb]
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    # only rank 0 wrote checkpoints and the export
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("step-")) == ["step-00000003"]
