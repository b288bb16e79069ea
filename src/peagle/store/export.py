"""Export a draft to the speculators format vLLM serves (config.json + model.safetensors).

``peagle export CKPT OUT``: CKPT is a training checkpoint (``step-XXXXXXXX/``), a run's output
directory (its newest complete checkpoint) or an exported draft directory. The result loads back
bit-exactly with ``PEagleDraft.from_pretrained`` (checked after writing).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from peagle.store.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from peagle.store.rundir import OutputPathError, check_output_dir, describe_entries, is_previous_export
from peagle.util.files import describe_os_error

__all__ = [
    "ExportError",
    "export_draft",
    "export_checkpoint",
    "find_draft_dir",
    "serving_warnings",
    "check_export_destination",
]



class ExportError(ValueError):
    """The source cannot be exported (not a checkpoint or draft, corrupt, or the round trip failed)."""



def check_export_destination(out: str | Path, *, overwrite: bool = False, what: str = "export destination") -> Path:
    """Refuse a destination the export would damage; returns ``out``. Creates and deletes nothing.

    Allowed: a new path, an empty directory, or (with ``overwrite``) a previous peagle export —
    exactly config.json + model.safetensors of a P-EAGLE draft. Anything else (a run directory,
    a model directory, a previous export with files added) is refused, naming what is there.
    """
    out = Path(out)
    try:
        check_output_dir(out, what)
    except OutputPathError as e:
        raise ExportError(str(e)) from None
    if not out.is_dir():
        return out
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return out
    if is_previous_export(out):
        if overwrite:
            return out
        raise ExportError(f"{what} {out} already holds a peagle export; pass --overwrite to replace it")
    ckpts = list_checkpoints(out)
    if ckpts:
        kind = f"a peagle run directory with {len(ckpts)} checkpoint(s): "
    elif (out / "config.json").is_file() and (any(out.glob("*.safetensors")) or any(out.glob("*.bin"))):
        kind = "a model directory: "
    else:
        kind = ""
    raise ExportError(
        f"{what} {out} is not empty and is not a peagle export (it holds {kind}{describe_entries(entries, out)}); "
        "nothing was written: choose a new or empty directory (--overwrite only replaces a previous export)"
    )


def serving_warnings(config: Any) -> list[str]:
    """What in a draft config vLLM (0.32) cannot serve as trained, each named (docs/evaluation.md).

    vLLM's P-EAGLE loader does not carry ``fc_norm`` (the draft is refused); a verifier name that is
    neither an existing local directory nor a hub id makes ``vllm serve DRAFT`` look in the wrong place;
    a verifier architecture whose model class in the installed vLLM lacks EAGLE-3 support (checked only
    where vLLM is installed) cannot be served with any draft.
    """
    out = []
    problem = _vllm_eagle3_warning(getattr(config, "verifier_architectures", None) or [])
    if problem is not None:
        out.append(problem)
    if getattr(config, "fc_norm", False):
        out.append("fc_norm = true: vLLM's P-EAGLE loader does not carry fc_norm and refuses this draft "
                   "(norm_before_fc is the pre-fc norm vLLM serves)")
    name = str(getattr(config, "verifier_name_or_path", "") or "")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if not name:
        out.append("no verifier recorded: pass --verifier (the target's directory or hub id) so "
                   "`vllm serve DRAFT` can find the target")
    elif looks_local and not Path(name).expanduser().is_dir():
        out.append(f"verifier {name!r} is not a local directory nor a hub id (org/name): `vllm serve DRAFT` "
                   "will not find the target; pass --verifier")
    return out


def _vllm_eagle3_warning(architectures: list[str]) -> str | None:
    """`vllm_engine.eagle3_support_problem`, None without vLLM here (the export never needs vLLM)."""
    if not architectures:
        return None
    from peagle.target.vllm_engine import VLLMError, eagle3_support_problem

    try:
        return eagle3_support_problem(architectures)
    except VLLMError:
        return None


def export_draft(
    draft: torch.nn.Module,
    out: str | Path,
    *,
    verifier: str | None = None,
    check: bool = True,
    overwrite: bool = False,
) -> Path:
    """``draft.save_pretrained(out)`` (fp32 master weights as stored), then verify the round trip.

    ``out`` must be new, empty, or (``overwrite``) a previous export (:func:`check_export_destination`);
    the new files replace it atomically.
    """
    from peagle.model.draft import PEagleDraft

    out = Path(out)
    check_export_destination(out, overwrite=overwrite)
    if verifier is not None:
        draft.config.verifier_name_or_path = verifier
    for line in serving_warnings(draft.config):
        print(f"peagle export: warning: {line}", file=sys.stderr)
    try:
        draft.save_pretrained(out)
    except OSError as e:
        raise ExportError(f"cannot write the export to {out}: {describe_os_error(e)}") from None
    if check:
        back = PEagleDraft.from_pretrained(out)
        ours = {k: v.detach().cpu() for k, v in draft.state_dict().items()}
        theirs = back.state_dict()
        bad = [k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k])]
        if bad or set(theirs) != set(ours):
            raise ExportError(f"exported draft in {out} does not load back bit-exactly (tensors {bad[:4]})")
    return out


def find_draft_dir(src: str | Path) -> Path:
    """The draft directory inside ``src`` (checkpoint, output dir or exported draft); verifies checkpoints."""
    src = Path(src)
    if not src.exists():
        raise ExportError(f"{src}: no such checkpoint or directory")
    if (src / "config.json").is_file() and (src / "model.safetensors").is_file():
        return src
    if (src / "draft").is_dir():
        try:
            verify_checkpoint(src)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        return src / "draft"
    ckpts = list_checkpoints(src)
    if ckpts:
        for _, path in reversed(ckpts):
            try:
                verify_checkpoint(path)
            except CheckpointError:
                continue
            return path / "draft"
        raise ExportError(f"{src}: no complete, uncorrupted checkpoint to export")
    raise ExportError(f"{src} is neither a training checkpoint, a run output directory nor an exported draft")


def export_checkpoint(
    src: str | Path, out: str | Path, *, verifier: str | None = None, overwrite: bool = False
) -> Path:
    """Export the draft of ``src`` into ``out`` (speculators format); returns ``out``.

    ``out`` must be new, empty, or (``overwrite``) a previous export; checked before ``src`` is read.
    """
    from peagle.model.draft import PEagleDraft

    out = Path(out)
    draft_dir = find_draft_dir(src)
    if out.resolve() == draft_dir.resolve():
        raise ExportError(f"output {out} is the source draft directory itself")
    check_export_destination(out, overwrite=overwrite)
    try:
        draft = PEagleDraft.from_pretrained(draft_dir)
    except (OSError, ValueError) as e:
        raise ExportError(f"{draft_dir}: {e}") from None
    return export_draft(draft, out, verifier=verifier, overwrite=overwrite)
