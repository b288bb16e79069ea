"""What a training run shows and leaves behind: metrics.jsonl, TensorBoard, the progress bar, report.md.

Only rank 0 writes (``RunLogger(enabled=d.main)``). On resume the metrics file and TensorBoard drop
what a killed process logged past the checkpoint, so the curves show each step once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from peagle.config.training import Config
from peagle.store.rundir import METRICS_FILE, REPORT_FILE
from peagle.util import plots

__all__ = ["RunLogger", "read_metrics", "write_report", "quiet_hf_progress"]


class RunLogger:
    """Rank-0 sinks: JSONL metrics file, TensorBoard scalars, the progress bar."""

    def __init__(self, cfg: Config, out: Path, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.file = None
        if not enabled:
            return
        path = out / METRICS_FILE
        if path.exists() and start > 0:  # drop records past the resumed step (they will be redone)
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= start]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif path.exists():
            path.unlink()
        self.file = open(path, "a")
        if cfg.train.tensorboard:
            # purge what a previous process logged past the checkpoint (steps > start), keep step start
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
        if cfg.train.progress:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any], prefix: str) -> None:
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k in ("step", "split") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def progress(self, record: dict[str, Any], num_depths: int) -> None:
        if self.bar is None:
            return
        accs = "/".join(f"{record.get(f'acc_{d}', float('nan')):.2f}" for d in range(min(num_depths, 4)))
        self.bar.set_postfix_str(f"loss={record['loss']:.3f} acc={accs} tok/s={record['tokens_per_s']:.0f}")
        self.bar.update(1)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, validation records) of a run's ``metrics.jsonl`` (empty lists if none)."""
    train_recs: list[dict[str, Any]] = []
    val_recs: list[dict[str, Any]] = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                (val_recs if rec.get("split") == "val" else train_recs).append(rec)
    return train_recs, val_recs


def _num(v: Any, spec: str = ".4f") -> str:
    return "n/a" if v is None or not isinstance(v, (int, float)) or not math.isfinite(float(v)) else format(v, spec)


def write_report(out: str | Path, cfg: Config, result: Any, draft_config: Any) -> Path:
    """``report.md`` + training PNGs (``peagle.util.plots.training_plots``) in the run directory; returns the report."""
    out = Path(out)
    k = cfg.model.num_depths
    train_recs, val_recs = read_metrics(out / METRICS_FILE)
    files = plots.training_plots(train_recs, val_recs, k, out)
    step_s = sum(float(r.get("step_s", 0.0)) for r in train_recs)
    tokens = sum(int(r.get("tokens", 0)) for r in train_recs)
    last = train_recs[-1] if train_recs else {}
    val = val_recs[-1] if val_recs else {}
    dc = draft_config
    lines: list[str] = []
    w = lines.append
    w("# peagle training report\n")
    w(f"Run directory `{out}`: {result.step} of {result.total_steps} optimizer steps, "
      f"{time.strftime('%Y-%m-%d %H:%M')}.\n")
    w(f"- target `{cfg.model.target}`, dataset `{cfg.data.dataset}`")
    w(f"- draft: {dc.num_hidden_layers} decoder layer(s), hidden {dc.hidden_size}, K = {k} parallel depths, "
      f"draft vocabulary {dc.draft_vocab_size} of {dc.vocab_size}, mask token {dc.mask_token_id}")
    w(f"- optimisation: lr {cfg.optim.lr:g} (warmup {cfg.optim.warmup_steps}, cosine to "
      f"{cfg.optim.min_lr_ratio:g}×), {cfg.train.micro_batch_size} rows × {cfg.train.grad_accum} "
      f"accumulation per rank, rows of {cfg.data.max_length} tokens")
    rate = tokens / step_s if step_s else 0.0
    w(f"- {tokens:,} tokens in {step_s:.1f} s of optimizer steps ({rate:,.0f} tokens/s)")
    if result.skipped_steps:
        w(f"- **{result.skipped_steps} step(s) skipped for a non-finite loss** (train.on_nonfinite: skip)")
    if last:
        accs = ", ".join(f"d{d} {_num(last.get(f'acc_{d}'), '.3f')}" for d in range(k))
        w(f"- last training step: loss {_num(last.get('loss'))}; top-1 agreement per depth: {accs}")
    if val:
        w(f"- last validation (step {val.get('step')}): loss {_num(val.get('loss'))}, "
          f"mean acceptance length {_num(val.get('acceptance_length'), '.3f')} at K = {k}")
    w(f"- checkpoint `{result.checkpoint}`; exported draft `{result.export_dir}`\n")
    if val_recs:
        has_al = any("acceptance_length" in r for r in val_recs)
        w("## Validation during training\n")
        al_cols = "".join(f" AL K={kk} |" for kk in range(1, k + 1)) if has_al else ""
        w("| step | val loss | val acc |" + al_cols)
        w("|---:|---:|---:|" + ("---:|" * k if has_al else ""))
        for r in val_recs:
            row = f"| {r.get('step')} | {_num(r.get('loss'))} | {_num(r.get('acc'), '.3f')} |"
            if has_al:
                row += "".join(f" {_num(r.get(f'al_k{kk}'), '.3f')} |" for kk in range(1, k + 1))
            w(row)
        w("")
    if files:
        w("## Plots\n")
        titles = {"loss": "training loss", "depth_accuracy": "top-1 agreement per depth",
                  "al_during_training": "acceptance length during training"}
        for name, path in files.items():
            w(f"![{titles.get(name, name)}]({Path(path).name})")
        w("")
    spec = json.dumps({"model": str(result.export_dir), "method": "eagle3", "parallel_drafting": True,
                       "num_speculative_tokens": k})
    w("## Next\n")
    w("```bash")
    w(f"peagle eval --target {cfg.model.target} --draft {out} --prompts PROMPTS.jsonl --out {out / 'eval'}")
    w(f"vllm serve {cfg.model.target_name or cfg.model.target} --speculative-config '{spec}'")
    w("```")
    path = out / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's progress bars (weight loading, downloads) inside the block.

    The previous state (environment variable and both libraries' switches) is restored on exit.
    """
    env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_off = are_progress_bars_disabled()
    tf_was_on = hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if tf_was_on:
            hf_logging.enable_progress_bar()
        if not hub_was_off:
            enable_progress_bars()
        if env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = env
