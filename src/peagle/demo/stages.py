"""What the demos' pipelines share (``peagle demo`` and ``peagle demo --real``): timed stages, the output
folder they own, the target link, the prepare stage and the training config they write.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from peagle.config.training import Config, load_config
from peagle.data.preparation import prepare
from peagle.data.summary import PrepareSummary
from peagle.demo.settings import DraftSettings
from peagle.eval.report import EvalResult
from peagle.eval.run import evaluate, load_draft
from peagle.target.hf import Target, embedding_rows

__all__ = ["MARKER", "DemoError", "Stages", "evaluate_offline", "link_target", "prepare_out_dir", "prepare_stage",
           "train_config", "write_train_config"]

MARKER = ".peagle-demo"  # marks an output folder the demo may clean and rewrite


class DemoError(RuntimeError):
    """A demo stage failed (the message names the stage)."""


class Stages:
    """Wall time of every stage, printed as it starts and ends."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as stage ``name``: timed, any failure re-raised as a :class:`DemoError`."""
        self.log(f"\n[demo] == {name} ==")
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        except DemoError:
            raise
        except Exception as e:
            raise DemoError(f"stage '{name}' failed: {type(e).__name__}: {e}") from e
        self.seconds[name] = time.perf_counter() - t0
        self.log(f"[demo] {name}: {self.seconds[name]:.1f}s")
        return out


def prepare_out_dir(out: Path, owned: Sequence[str], command: str = "peagle demo") -> None:
    """Create ``out``, or clean what a previous demo wrote there (``owned`` names and ``*.png``); refuse a
    foreign non-empty folder."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise DemoError(f"--out {out} is a non-empty folder the demo did not create; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for name in owned:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for png in out.glob("*.png"):
        png.unlink()
    (out / MARKER).write_text(f"written by `{command}`; rerunning the demo replaces this folder's contents\n")


def link_target(out: Path, target_dir: Path) -> None:
    """``out/target``: a link to the cached target, where the report and README commands find it."""
    link = out / "target"
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(target_dir, target_is_directory=True)


def prepare_stage(out: Path, target_dir: Path, s: DraftSettings, progress: bool,
                  log: Callable[[str], None]) -> PrepareSummary:
    """What ``peagle prepare`` runs (the command in the report): tokenize and pack ``data/train_chats.jsonl``
    into ``prepared/``, choosing the draft vocabulary and the mask token (``auto``)."""
    summary = prepare(out / "data" / "train_chats.jsonl", target_dir, out / "prepared", max_length=s.max_length,
                      vocab_size=embedding_rows(target_dir), draft_vocab_size=s.draft_vocab_size,
                      progress=progress)
    log(summary.format_summary())
    return summary


def train_config(out: Path, target_dir: Path, s: DraftSettings, progress: bool) -> dict[str, Any]:
    """The training config a demo writes (``out/train.yaml``), as a dict a pipeline may amend."""
    return {
        "data": {"dataset": str(out / "prepared"), "max_length": s.max_length, "val_fraction": s.val_fraction},
        "model": {"target": str(target_dir), "num_layers": s.num_layers,
                  "num_depths": s.num_depths, "init_lm_head_from_target": True},
        "optim": {"lr": s.lr, "warmup_steps": s.warmup_steps, "min_lr_ratio": 0.1, "weight_decay": 0.0},
        "train": {"output_dir": str(out / "run"), "micro_batch_size": s.micro_batch_size, "grad_accum": 1,
                  "max_steps": s.steps, "seed": 0, "save_every": 0, "keep_last": 1,
                  "eval_every": s.eval_every, "log_every": 1, "device": "cpu", "tensorboard": False,
                  "progress": progress, "dtype": "fp32"},
        "eval": {"prompts": str(out / "data" / "heldout.jsonl"), "num_prompts": s.num_al_prompts,
                 "max_new_tokens": s.max_new_tokens},
    }


def write_train_config(out: Path, config: dict[str, Any], command: str = "peagle demo") -> Config:
    """Write ``out/train.yaml`` (what ``peagle train`` would read) and load it back."""
    path, run_dir = out / "train.yaml", config["train"]["output_dir"]
    path.write_text(f"# written by `{command}`; rerun with: peagle train {path} (after removing {run_dir})\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return load_config(path)


def evaluate_offline(out: Path, target_dir: Path, s: DraftSettings, progress: bool,
                     batch_size: int = 64) -> EvalResult:
    """``peagle eval`` of the final checkpoint on ``data/heldout.jsonl`` (AL for every K'), in fp32; writes
    ``plots/`` and ``eval.json``."""
    draft = load_draft(out / "run" / "final")
    target = Target(target_dir, device="cpu", aux_layer_ids=draft.config.aux_layer_ids)
    return evaluate(target, draft, out / "data" / "heldout.jsonl", s.max_new_tokens, s.num_depths,
                    out_dir=out / "plots", json_path=out / "eval.json", batch_size=batch_size, progress=progress,
                    print_report=False)
