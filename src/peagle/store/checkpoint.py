"""Atomic, verifiable training checkpoints and exact-resume state.

Layout of ``<output_dir>/step-00000042/``::

    draft/config.json, draft/model.safetensors   the draft (speculators format, `PEagleDraft.save_pretrained`)
    optimizer.pt                                 AdamW ``state_dict()`` (parameters by index; whole under FSDP too)
    rng.pt                                       RNG states of every rank (python, numpy, torch, cuda)
    trainer_state.json                           step, data position, scheduler state, world geometry
    config.yaml                                  the run config
    COMPLETE                                     sha256 + size of every file above, written last

A checkpoint is written through :func:`peagle.util.files.atomic_dir` into ``.step-XXXXXXXX.tmp-<hex>/``,
the ``COMPLETE`` marker written last, every file and directory fsync'ed, then the directory is renamed
into place (atomic on POSIX) and the parent fsync'ed. A checkpoint of the same step left by an
abandoned run is swapped out (moved aside to ``.step-XXXXXXXX.old-<hex>``, removed after the rename).
A run killed mid-write therefore leaves only a hidden temporary, which is ignored (and removed by the
next save); a checkpoint whose files do not match ``COMPLETE`` is refused on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peagle.util.files import atomic_dir, clean_leftovers

__all__ = [
    "CheckpointError",
    "TrainState",
    "checkpoint_name",
    "list_checkpoints",
    "verify_checkpoint",
    "resolve_resume",
    "save_checkpoint",
    "load_checkpoint",
    "read_optimizer_state",
    "capture_rng",
    "restore_rng",
]


FORMAT_VERSION = 1
MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")
_LEGACY_TMP_RE = re.compile(r"^step-\d+\.(tmp|replaced)$")  # temporaries of peagle before files.atomic_dir


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, incompatible)."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments needed to continue a run exactly."""

    step: int = 0
    epoch: int = 0
    row_in_epoch: int = 0  # global rows (all ranks) of this epoch already consumed
    rows_per_step: int = 0  # world_size * grad_accum * micro_batch_size when saved
    world_size: int = 1
    scheduler: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (train.on_nonfinite: skip)
    autocast_dtype: str = ""  # what train.dtype resolved to when the run started ("bf16" | "fp32")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint at ``step``."""
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every renamed-into-place checkpoint directory, by increasing step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# files, hashes, fsync


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check ``path`` against its ``COMPLETE`` marker; return the marker or raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {MARKER} marker: its write was interrupted); "
            "resume from an earlier checkpoint"
        )
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {MARKER} marker") from None
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            what = "truncated" if size < meta["bytes"] else "the wrong size"
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} is {what} ({size} of {meta['bytes']} bytes)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} does not match its sha256")
    return info


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: an explicit path, or ``"auto"`` = newest complete one in ``output_dir``.

    ``auto`` with no checkpoint returns None (start fresh). A corrupt or incomplete checkpoint is
    refused with a message naming the newest good one; nothing is deleted.
    """
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not (path / MARKER).exists() and list_checkpoints(path):
            path = list_checkpoints(path)[-1][1]  # an output dir: its newest checkpoint
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{_good_hint(path.parent, exclude=path)}") from None
        return path
    candidates = [p for _, p in list_checkpoints(output_dir)]
    if not candidates:
        return None
    newest = candidates[-1]
    try:
        verify_checkpoint(newest)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_good_hint(Path(output_dir), exclude=newest)}") from None
    return newest


def _good_hint(output_dir: Path, exclude: Path) -> str:
    for _, p in reversed(list_checkpoints(output_dir)):
        if p.resolve() == exclude.resolve():
            continue
        try:
            verify_checkpoint(p)
        except CheckpointError:
            continue
        return f"; the newest good checkpoint is {p} (pass --resume {p})"
    return ""


# ---------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# save / load


def _save_model(model: torch.nn.Module, out: Path) -> None:
    save = getattr(model, "save_pretrained", None)
    if callable(save):
        save(out)
    else:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(sd, str(out / "model.safetensors"))


def save_checkpoint(
    output_dir: str | Path,
    state: TrainState,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    rng_states: list[dict[str, Any]],
    config: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write the checkpoint of ``state.step`` atomically; prune to ``keep_last``; return its path.

    Call on one process only (rank 0); ``rng_states`` holds every rank's :func:`capture_rng`.
    ``model`` is the whole draft and ``optimizer`` the optimizer or its ``state_dict()`` (what a sharded
    run gathers: `peagle.run.distributed.full_optimizer_state`), so every run writes one layout.
    A failed write (disk full, I/O error) removes its partial files and raises :class:`CheckpointError`;
    the previous checkpoints are untouched (pruning only follows a complete write).
    """
    from peagle.util.files import describe_os_error

    root = Path(output_dir)
    name = checkpoint_name(state.step)
    final = root / name
    if final.exists() and not _is_checkpoint_dir(final):
        raise CheckpointError(f"{final} exists and is not a peagle checkpoint: move it away (nothing was written)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale(root)
        # replace=True: a checkpoint of the same step from an abandoned run is swapped out
        with atomic_dir(final, replace=True, fsync=True) as tmp:
            _write_checkpoint(tmp, state, model, optimizer, rng_states, config)
    except OSError as e:
        prev = [p for _, p in list_checkpoints(root) if p != final]
        kept = f"the previous checkpoints are intact (newest: {prev[-1]})" if prev else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {final}: {describe_os_error(e)}; {kept}") from None
    if keep_last is not None:
        _prune(root, keep_last, keep=final)
    return final


def _clean_stale(root: Path) -> None:
    """Remove the temporaries of saves killed mid-write (this run holds the output dir's lock)."""
    clean_leftovers(root, "step-*")
    for p in root.iterdir():
        m = _LEGACY_TMP_RE.match(p.name)
        if m is None:
            continue
        final = root / p.name.rsplit(".", 1)[0]
        if m.group(1) == "replaced" and not final.exists():  # killed between the two renames of a swap
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _is_checkpoint_dir(path: Path) -> bool:
    """A directory peagle wrote as a checkpoint (complete, or interrupted after its state file)."""
    return path.is_dir() and ((path / MARKER).is_file() or (path / "trainer_state.json").is_file())


def _write_checkpoint(
    tmp: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    rng_states: list[dict[str, Any]],
    config: dict[str, Any],
) -> None:
    """Every file of a checkpoint into ``tmp``, ``COMPLETE`` (their sizes and sha256) last."""
    import yaml

    _save_model(model, tmp / "draft")
    torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(
        json.dumps({"format": FORMAT_VERSION, **state.__dict__}, indent=2, default=_json_default)
    )
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    files = {f.relative_to(tmp).as_posix(): {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in _files(tmp)}
    marker = tmp / MARKER
    marker.write_text(json.dumps({"format": FORMAT_VERSION, "step": state.step, "files": files}, indent=1))


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    others = [p for _, p in list_checkpoints(root) if p != keep and _is_checkpoint_dir(p)]
    for p in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    verify: bool = True,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Verify ``path``, load weights into ``model`` and moments into ``optimizer``.

    Returns the :class:`TrainState` and the per-rank RNG states (apply one with :func:`restore_rng`).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if verify:
        verify_checkpoint(path)
    raw = json.loads((path / "trainer_state.json").read_text())
    raw.pop("format", None)
    extra = raw.pop("extra", None)  # trainer_state.json before skipped_steps: {"extra": {"nonfinite_skipped": n}}
    if isinstance(extra, dict) and "nonfinite_skipped" in extra:
        raw.setdefault("skipped_steps", int(extra["nonfinite_skipped"]))
    known = set(TrainState.__dataclass_fields__)
    state = TrainState(**{k: v for k, v in raw.items() if k in known})
    if model is not None:
        sd = load_file(str(path / "draft" / "model.safetensors"))
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).splitlines()[0])
            raise CheckpointError(
                f"checkpoint {path} does not fit this draft ({first}): was the model config changed?"
            ) from None
        omitted = getattr(model, "_omitted_keys", None)  # e.g. d2t/t2d of a full-vocabulary draft
        if callable(omitted):
            missing = [k for k in missing if k not in set(omitted())]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path} does not fit this draft (missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(unexpected)[:4]}): was the model config changed?"
            )
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(path))
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    return state, rng


def read_optimizer_state(path: str | Path) -> dict[str, Any]:
    """The AdamW ``state_dict()`` stored in checkpoint ``path`` (on the CPU)."""
    return torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)


def load_config_dict(path: str | Path) -> dict[str, Any]:
    """The run config stored in a checkpoint."""
    import yaml

    return yaml.safe_load((Path(path) / "config.yaml").read_text())
