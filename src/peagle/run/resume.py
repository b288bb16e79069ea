"""Resuming with a changed config: which keys may differ from the checkpoint's, and how.

FREE keys (how long, how often, where to log, how to compute the same thing — ``train.parallel`` too: DDP
and FSDP checkpoints are one layout, the whole draft and AdamW state, and both sum the same gradients)
are applied and logged; ACCEPTABLE ones change the optimisation from the resumed step and need
``--accept-change KEY``; every other key (the draft's shape and vocabulary, the data split and order,
initialisation) cannot change on resume. A refusal lists every difference in one line (docs/training.md, "Resume").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from peagle.config.training import SECTIONS, Config, ConfigError, all_keys, config_to_dict, did_you_mean
from peagle.data.vocab import DraftVocab
from peagle.store.checkpoint import CheckpointError

__all__ = ["RESUME_FREE", "RESUME_ACCEPTABLE", "why_fixed", "config_changes", "parse_accept_changes",
           "resume_changes", "check_resume_vocab"]

RESUME_FREE = frozenset({
    "train.max_steps", "train.epochs", "train.save_every", "train.keep_last", "train.eval_every",
    "train.log_every", "train.progress", "train.tensorboard", "train.output_dir", "train.on_nonfinite",
    "train.device", "train.parallel", "model.sequence_partitions", "model.activation_checkpointing",
    "model.target_name", "model.trust_remote_code", "eval.enabled", "eval.prompts", "eval.num_prompts",
    "eval.max_new_tokens", "data.stream_servers", "data.stream_prefetch", "data.stream_retries", "data.stream_timeout",
    "data.stream_concurrency", "data.stream_tensor_parallel_size", "data.stream_gpu_memory_utilization",
})
RESUME_ACCEPTABLE = frozenset({
    "optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.warmup_steps", "optim.min_lr_ratio",
    "optim.grad_clip", "model.ratio", "model.ratio_min", "model.max_anchors", "model.loss_normalization",
    "model.target", "model.target_dtype", "data.cache", "data.states", "train.micro_batch_size", "train.grad_accum",
    "train.dtype",
})


def why_fixed(key: str) -> str:
    """Why ``key`` cannot change on resume."""
    if key.startswith("data."):
        return "the data position refers to the old split and packing"
    if key == "train.seed":
        return "epoch orders and COD samples come from the seed"
    if key.startswith("model.init_"):
        return "it only acts when a run starts"
    return "the checkpoint fixes the draft's shape, vocabulary and trained parameters"


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every key of ``new`` whose value differs from ``old``.

    A key missing from ``old`` (a config written before the key existed) counts as its default.
    """
    out = []
    for sec, cls in SECTIONS.items():
        a, b = old.get(sec) or {}, new.get(sec) or {}
        for f in dataclasses.fields(cls):
            if f.name not in b:
                continue
            if f.name in a:
                before = a[f.name]
            elif f.default is not dataclasses.MISSING:
                before = f.default
            elif f.default_factory is not dataclasses.MISSING:
                before = f.default_factory()
            else:
                before = None
            after = b[f.name]
            if isinstance(before, tuple):
                before = list(before)
            if before != after:
                out.append((f"{sec}.{f.name}", before, after))
    return out


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def parse_accept_changes(items: list[str] | tuple[str, ...]) -> set[str]:
    """Validate ``--accept-change`` keys (repeatable, comma-separated); raise :class:`ConfigError`."""
    keys: set[str] = set()
    valid = set(all_keys())
    for item in items:
        for key in (k.strip() for k in item.split(",")):
            if not key:
                continue
            if key not in valid:
                raise ConfigError(f"--accept-change: unknown key '{key}'{did_you_mean(key)}")
            if key not in RESUME_FREE and key not in RESUME_ACCEPTABLE:
                raise ConfigError(
                    f"--accept-change {key}: {key} cannot change on resume ({why_fixed(key)}); "
                    "train it in a new train.output_dir"
                )
            keys.add(key)
    return keys


def resume_changes(old: dict[str, Any], cfg: Config, accepted: set[str], ckpt: Path, step: int) -> list[str]:
    """The config changes a resume applies (as log lines), or :class:`ConfigError` listing refused ones."""
    changes = config_changes(old, config_to_dict(cfg))
    applied, need, fixed = [], [], []
    for key, a, b in changes:
        text = f"{key} {_show(a)} → {_show(b)}"
        if key in RESUME_FREE or (key in RESUME_ACCEPTABLE and key in accepted):
            applied.append(text)
        elif key in RESUME_ACCEPTABLE:
            need.append((key, text))
        else:
            fixed.append((key, f"{text} (cannot change on resume: {why_fixed(key)})"))
    if need or fixed:
        msg = (
            f"resuming from {ckpt} with a config that differs from the checkpoint's: "
            + ", ".join(t for _, t in fixed + need)
        )
        if fixed:
            msg += (
                f"; restore {', '.join(k for k, _ in fixed)} or train in a new train.output_dir"
            )
        if need:
            msg += (
                f"; to apply {'them' if len(need) > 1 else 'it'} from step {step + 1}, pass "
                + " ".join(f"--accept-change {k}" for k, _ in need)
            )
        raise ConfigError(msg)
    changed = {k for k, _, _ in changes}
    for key in sorted(accepted - changed):
        applied.append(f"--accept-change {key}: unchanged from the checkpoint (nothing to apply)")
    return applied


def check_resume_vocab(ckpt: Path, vocab: DraftVocab, mask: int, cfg: Config) -> None:
    """Refuse resuming a checkpoint whose draft vocabulary or mask token differ from this dataset's."""
    draft_dir = ckpt / "draft"
    try:
        raw = json.loads((draft_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: unreadable draft/config.json") from None
    where = f"data.dataset {cfg.data.dataset}"
    old_size = raw.get("draft_vocab_size")
    if old_size is not None and int(old_size) != vocab.size:
        raise ConfigError(
            f"cannot resume from {ckpt}: it was trained with a draft vocabulary of {old_size} tokens, {where} "
            f"gives {vocab.size}; resume with the dataset it was trained on (or train in a new train.output_dir)"
        )
    old_mask = raw.get("mask_token_id")
    if old_mask is not None and int(old_mask) != int(mask):
        raise ConfigError(
            f"cannot resume from {ckpt}: it was trained with mask_token_id {old_mask}, {where} gives {mask}; "
            "resume with the dataset it was trained on (or set model.mask_token_id)"
        )
    with safe_open(str(draft_dir / "model.safetensors"), framework="pt") as f:
        if "d2t" in f.keys():
            old_d2t = f.get_tensor("d2t").to(torch.int64)
            if old_d2t.shape != vocab.d2t.shape or not torch.equal(old_d2t, vocab.d2t.to(torch.int64)):
                raise ConfigError(
                    f"cannot resume from {ckpt}: its draft vocabulary ({old_d2t.numel()} tokens) is not the one "
                    f"{where} gives (same size, other tokens: was the dataset prepared again?); resume with the "
                    "dataset it was trained on (or train in a new train.output_dir)"
                )
