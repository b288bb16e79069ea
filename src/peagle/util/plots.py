"""PNG plots shared by evaluation, training reports and the demo.

Every function takes plain Python numbers (lists, dicts), writes one PNG and returns its path, so a
caller never touches matplotlib. Figures are drawn with the Agg canvas directly (no pyplot, no
global backend switch), which works headless and does not disturb a user's interactive session.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_acceptance_bars",
    "plot_al_histogram",
    "plot_al_vs_k",
    "plot_depth_accuracy",
    "plot_lines",
    "plot_loss_curve",
    "training_plots",
]

_SIZE = (6.4, 4.0)
_DPI = 110


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _clean(values: Sequence[float | None]) -> list[float]:
    """None → NaN so matplotlib leaves a gap instead of failing."""
    return [float("nan") if v is None else float(v) for v in values]


def plot_lines(
    path: str | Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str = "step",
    ylabel: str = "",
    title: str = "",
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Generic line plot: one line per named series over the same x (NaN/None values leave gaps)."""
    fig, ax = _figure()
    for name, ys in series.items():
        ys = _clean(ys)
        if len(ys) != len(x):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(x)} x values")
        ax.plot(list(x), ys, label=name, marker="." if len(x) <= 40 else None)
    if logy and any(v > 0 for s in series.values() for v in _finite(s)):
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_loss_curve(
    steps: Sequence[float],
    losses: Sequence[float],
    path: str | Path,
    *,
    val_steps: Sequence[float] | None = None,
    val_losses: Sequence[float] | None = None,
    title: str = "Training loss (KL per supervised element)",
) -> Path:
    """Training loss over steps (log scale), optionally with validation points."""
    fig, ax = _figure()
    ax.plot(list(steps), _clean(losses), label="train")
    if val_steps is not None and val_losses is not None and len(val_steps):
        ax.plot(list(val_steps), _clean(val_losses), marker="o", label="validation")
        ax.legend(fontsize="small")
    if any(v > 0 for v in _finite(losses)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_depth_accuracy(
    steps: Sequence[float],
    acc_by_depth: Mapping[int, Sequence[float | None]] | Sequence[Sequence[float | None]],
    path: str | Path,
    *,
    title: str = "Top-1 agreement with the target per depth",
) -> Path:
    """Per-depth top-1 accuracy curves (depth 0 = the bonus-token slot, d ≥ 1 = mask slots)."""
    items = acc_by_depth.items() if isinstance(acc_by_depth, Mapping) else enumerate(acc_by_depth)
    series = {f"depth {int(d)}": list(v) for d, v in items}
    return plot_lines(path, steps, series, ylabel="accuracy", title=title, ylim=(0.0, 1.02))


def plot_acceptance_bars(
    per_position: Sequence[float],
    path: str | Path,
    *,
    title: str = "Per-position acceptance rate (cumulative, vLLM definition)",
) -> Path:
    """Bars of the cumulative per-position acceptance rate: position i = drafts with ≥ i tokens accepted."""
    fig, ax = _figure()
    values = _clean(per_position)
    xs = list(range(1, len(values) + 1))
    bars = ax.bar(xs, values, color="#3b75af")
    for bar, v in zip(bars, values, strict=True):
        if math.isfinite(v):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                        fontsize="small")
    ax.set_xticks(xs)
    ax.set_ylim(0.0, 1.08)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_al_vs_k(
    al_by_k: Mapping[int | str, float],
    path: str | Path,
    *,
    title: str = "Mean acceptance length vs speculative tokens K",
) -> Path:
    """Mean acceptance length (bonus token included) for each served K, with the ideal K + 1 line."""
    pairs = sorted((int(k), float(v)) for k, v in al_by_k.items())
    fig, ax = _figure()
    ks = [k for k, _ in pairs]
    ax.plot(ks, [v for _, v in pairs], marker="o", label="draft")
    ax.plot(ks, [k + 1 for k in ks], linestyle="--", color="grey", label="all accepted (K + 1)")
    for k, v in pairs:
        if math.isfinite(v):
            ax.annotate(f"{v:.2f}", (k, v), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize="small")
    ax.set_xticks(ks)
    ax.set_xlabel("K (num_speculative_tokens)")
    ax.set_ylabel("mean acceptance length")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_al_histogram(
    per_prompt_al: Sequence[float | None],
    path: str | Path,
    *,
    title: str = "Acceptance length per prompt",
    bins: int = 20,
) -> Path:
    """Histogram of the per-prompt mean acceptance length (prompts without drafts are skipped)."""
    values = _finite([v for v in per_prompt_al if v is not None])
    fig, ax = _figure()
    if values:
        ax.hist(values, bins=max(1, min(bins, len(set(values)) * 2)), color="#3b75af", edgecolor="white")
        mean = sum(values) / len(values)
        ax.axvline(mean, color="black", linestyle="--", label=f"mean of prompts {mean:.2f}")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no drafts", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("mean acceptance length")
    ax.set_ylabel("prompts")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def training_plots(
    train_records: Sequence[Mapping[str, float]],
    val_records: Sequence[Mapping[str, float]],
    num_depths: int,
    out_dir: str | Path,
) -> dict[str, str]:
    """The plots of a training run from its metrics records (``metrics.jsonl`` rows), PNG paths by name.

    ``loss.png`` (train loss, validation points), ``depth_accuracy.png`` (top-1 agreement per depth on
    the training batches) and, when acceptance length was measured, ``al_during_training.png``
    (AL for every K' = 1..K). No training record: no plot.
    """
    out = Path(out_dir)
    files: dict[str, str] = {}
    steps = [r["step"] for r in train_records]
    if not steps:
        return files
    v_loss = [r for r in val_records if "loss" in r]
    files["loss"] = str(plot_loss_curve(
        steps, [r.get("loss") for r in train_records], out / "loss.png",
        val_steps=[r["step"] for r in v_loss], val_losses=[r["loss"] for r in v_loss]))
    files["depth_accuracy"] = str(plot_depth_accuracy(
        steps, {d: [r.get(f"acc_{d}") for r in train_records] for d in range(num_depths)},
        out / "depth_accuracy.png", title="Top-1 agreement with the target per depth (training batches)"))
    v_al = [r for r in val_records if "acceptance_length" in r]
    if v_al:
        files["al_during_training"] = str(plot_lines(
            out / "al_during_training.png", [r["step"] for r in v_al],
            {f"K={kk}": [r.get(f"al_k{kk}") for r in v_al] for kk in range(1, num_depths + 1)},
            ylabel="mean acceptance length", title="Acceptance length on held-out prompts during training"))
    return files
