"""Export a draft to the speculators format vLLM serves (config.json + model.safetensors).

``peagle export CKPT OUT``: CKPT is a training checkpoint (``step-XXXXXXXX/``), a run's output
directory (its newest complete checkpoint) or an exported draft directory. The result loads back
bit-exactly with ``PEagleDraft.from_pretrained`` (checked after writing).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, list_checkpoints, verify_checkpoint

__all__ = ["ExportError", "export_draft", "export_checkpoint", "find_draft_dir"]


class ExportError(ValueError):
    """The source cannot be exported (not a checkpoint or draft, corrupt, or the round trip failed)."""


def export_draft(draft: torch.nn.Module, out: str | Path, *, verifier: str | None = None, check: bool = True) -> Path:
    """``draft.save_pretrained(out)`` (fp32 master weights as stored), then verify the round trip."""
    from .draft import PEagleDraft

    out = Path(out)
    if verifier is not None:
        draft.config.verifier_name_or_path = verifier
    draft.save_pretrained(out)
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


def export_checkpoint(src: str | Path, out: str | Path, *, verifier: str | None = None) -> Path:
    """Export the draft of ``src`` into ``out`` (speculators format); returns ``out``."""
    from .draft import PEagleDraft

    draft_dir = find_draft_dir(src)
    out = Path(out)
    if out.resolve() == draft_dir.resolve():
        raise ExportError(f"output {out} is the source draft directory itself")
    try:
        draft = PEagleDraft.from_pretrained(draft_dir)
    except (OSError, ValueError) as e:
        raise ExportError(f"{draft_dir}: {e}") from None
    return export_draft(draft, out, verifier=verifier)
