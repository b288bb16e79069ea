"""Helpers shared by the streamed-states tests of both suites: `tests/unit/run/test_stream_run.py` (no vLLM) and
`tests_vllm/test_stream.py` (the real vLLM; its conftest puts this directory on ``sys.path``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["stream_config", "train_records"]


def stream_config(out: Path, dataset: Path, target: Path, *, max_length: int, steps: int,
                  data: dict[str, Any] | None = None, optim: dict[str, Any] | None = None,
                  train: dict[str, Any] | None = None) -> Path:
    """``OUT.yaml`` beside ``out``: a 1-layer K = 3 draft on ``dataset`` for ``target``, fp32, ``steps`` steps of
    2 micro-batches of one row, no checkpoints before the end, no acceptance-length eval, output ``out``.
    ``data``, ``optim`` and ``train`` update their sections (``data={"states": "stream"}``)."""
    cfg: dict[str, dict[str, Any]] = {
        "data": {"dataset": str(dataset), "max_length": max_length, **(data or {})},
        "model": {"target": str(target), "num_layers": 1, "num_depths": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 1, **(optim or {})},
        # fp32: the comparisons are bitwise or to fp32 rounding
        "train": {"dtype": "fp32", "output_dir": str(out), "micro_batch_size": 1, "grad_accum": 2,
                  "max_steps": steps, "save_every": 0, "progress": False, "tensorboard": False, **(train or {})},
        "eval": {"enabled": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_records(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run's metrics.jsonl: its training steps (step, tokens, supervised, loss, grad_norm, acc) and its
    validations (step, loss, acc)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keep = ("step", "tokens", "supervised", "loss", "grad_norm", "acc")
    train = [{k: r[k] for k in keep if k in r} for r in rows if r.get("split") != "val" and "loss" in r]
    val = [{k: r[k] for k in ("step", "loss", "acc")} for r in rows if r.get("split") == "val"]
    return train, val
