"""The training loop: data → target states → P-EAGLE steps, single process or under ``torchrun``.

One optimizer step consumes ``G = world_size × grad_accum × micro_batch_size`` packed rows of the
current epoch (micro-batch j of rank r = rows ``[(j·W + r)·mb, (j·W + r + 1)·mb)`` of the step), so
the union of a step's rows depends only on G, not on how it is split over ranks and micro-batches.
COD seeds come from (run seed, epoch, example index), so sampling is the same whatever the split.

The loss of every forward is its KL sum divided by ONE count: the supervised COD elements of the
whole optimizer step (counted before any forward, all-reduced over ranks). DDP gradients are summed
(not averaged) by a communication hook, so W ranks × A micro-batches give the gradient of one
process on the union batch. Sequence partitions run one backward per unit with ``no_sync`` on every
backward but the step's last; in one process each micro-batch's units are summed apart and then added
to the step's gradient (`_own_gradient`), so the rounding is that of the ranks' all-reduce.

Exact resume: a checkpoint holds the draft, AdamW moments, scheduler, RNG states and the data
position (epoch, rows consumed); epoch orders are recomputed from the seed, so a resumed run takes
the same steps as one that never stopped. SIGINT/SIGTERM: the current step finishes, a checkpoint
is written, and ``peagle train`` exits with status 130 (``TrainResult.interrupted``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (
    CheckpointError,
    TrainState,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    load_config_dict,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from .config import Config, ConfigError, config_to_dict
from .rundir import LOCK_FILE, RunLock, check_output_dir, describe_entries, foreign_entries

__all__ = [
    "TrainResult",
    "NonFiniteError",
    "train",
    "lr_factor",
    "read_metrics",
    "write_report",
    "INTERRUPTED_EXIT_CODE",
    "RESUME_FREE",
    "RESUME_ACCEPTABLE",
]

INTERRUPTED_EXIT_CODE = 130
VAL_EPOCH = -1  # COD seed "epoch" of the validation split: the same sample at every evaluation
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.md"
# What a run writes into train.output_dir besides step-XXXXXXXX/ checkpoints (a fresh run refuses
# a directory holding anything else: it never writes over files it did not create).
RUN_FILES = frozenset(
    {"config.yaml", METRICS_FILE, "tensorboard", FINAL_DIR, REPORT_FILE, LOCK_FILE,
     "loss.png", "depth_accuracy.png", "al_during_training.png"}
)


class NonFiniteError(ValueError):
    """The loss, a gradient or a weight became NaN/inf (``train.on_nonfinite: stop``); nothing was saved."""


@dataclass
class TrainResult:
    """What a ``train`` call did."""

    step: int
    total_steps: int
    interrupted: bool
    output_dir: Path
    checkpoint: Path | None = None
    export_dir: Path | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (train.on_nonfinite: skip)
    report: Path | None = None


# ---------------------------------------------------------------------------------------------
# schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, cosine to the floor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# distributed


@dataclass
class _Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _init_distributed(device_pref: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        here = True
    return _Dist(rank, world, local_rank, device, here)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP kwargs that skip the per-forward buffer broadcast (our buffers never change)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _all_reduce(t: Tensor, d: _Dist) -> Tensor:
    if d.active:
        dist.all_reduce(t)
    return t


def _sum_hook(state, bucket):  # noqa: ANN001, ANN202 - DDP inspects the annotations: leave none
    """DDP communication hook: SUM gradients over ranks (the loss is already globally normalised)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# ---------------------------------------------------------------------------------------------
# data


class _Data:
    """Train/val split, per-epoch packed rows, and Batch assembly (online target or offline cache)."""

    def __init__(self, cfg: Config, prepared: Any, rows_per_step: int) -> None:
        from .data import pack

        self.cfg = cfg
        self.prepared = prepared
        self.lengths = prepared.lengths
        n = len(self.lengths)
        max_length = cfg.data.max_length
        too_long = [i for i, L in enumerate(self.lengths) if L > max_length]
        if too_long:
            raise ConfigError(
                f"data.max_length {max_length} is shorter than {len(too_long)} prepared examples "
                f"(longest {max(self.lengths)} tokens); raise it or prepare with --max-length {max_length}"
            )
        # split by source chat (all examples of one chat on one side), in a seeded random order of chats
        groups = prepared.record_groups()
        g = torch.Generator().manual_seed(cfg.train.seed)
        perm = torch.randperm(len(groups), generator=g).tolist()
        n_val = 0
        if cfg.data.val_fraction > 0:
            n_val = max(1, round(n * cfg.data.val_fraction))
        val: list[int] = []
        for j in perm:
            if len(val) >= n_val:
                break
            val += groups[j]
        if n_val and len(val) >= n:
            raise ConfigError(f"data.val_fraction {cfg.data.val_fraction} leaves no training example ({n})")
        self.val_ids = sorted(val)
        self.train_ids = sorted(set(range(n)) - set(val))
        self.rows_per_step = rows_per_step
        self._pack = pack
        self._epoch_cache: dict[int, list[list[int]]] = {}
        rows0 = len(self.epoch_rows(0))
        if rows0 < rows_per_step:
            raise ConfigError(
                f"the training split packs into {rows0} rows of {max_length} tokens, but one optimizer step "
                f"needs {rows_per_step} rows (world size × train.grad_accum × train.micro_batch_size); "
                "lower those, or data.max_length"
            )
        self.val_rows = (
            [[self.val_ids[i] for i in row] for row in pack([self.lengths[i] for i in self.val_ids], max_length)]
            if self.val_ids
            else []
        )

    def heldout_prompts(self, n: int) -> list[dict[str, Any]]:
        """Prompts of the first ``n`` validation examples: their tokens before the first supervised one.

        The acceptance-length prompts when ``eval.prompts`` is not given (the target writes the answer).
        """
        out = []
        for i in self.val_ids:
            ex = self.prepared[i]
            first = next((j for j, m in enumerate(ex["loss_mask"]) if m), 0)
            if first > 0:
                out.append({"input_ids": list(ex["input_ids"][:first]), "_where": f"validation example {i}"})
            if len(out) == n:
                break
        return out

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Packed rows (global example indices) of ``epoch``: a deterministic function of (seed, epoch)."""
        rows = self._epoch_cache.get(epoch)
        if rows is None:
            seed = None
            if self.cfg.data.shuffle:
                seed = (self.cfg.train.seed * 1_000_003 + epoch * 7_919 + 1) % (2**62)
            local = self._pack([self.lengths[i] for i in self.train_ids], self.cfg.data.max_length, seed=seed)
            rows = [[self.train_ids[i] for i in row] for row in local]
            self._epoch_cache = {e: r for e, r in self._epoch_cache.items() if e >= epoch - 1}
            self._epoch_cache[epoch] = rows
        return rows

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.epoch_rows(epoch)) // self.rows_per_step

    def collate(self, rows: list[list[int]]) -> Any:
        from .data import collate

        return collate(self.prepared, rows, self.cfg.data.max_length)


@dataclass
class _Micro:
    """One micro-batch: packed rows (unshifted) plus its shifted COD inputs."""

    packed: Any
    shifted: Any  # data.Shifted without hidden states
    seeds: Tensor
    tokens: int


def _micro(data: _Data, rows: list[list[int]], run_seed: int, epoch: int) -> _Micro:
    from .data import cod_seeds, eagle_shift

    packed = data.collate(rows)
    sh = eagle_shift(packed.input_ids, packed.loss_mask, packed.document_ids, example_index=packed.example_index)
    seeds = cod_seeds(sh.example_index, run_seed, epoch)
    return _Micro(packed, sh, seeds, int((packed.document_ids >= 0).sum()))


def _count_batch(m: _Micro, aux_width: int, hidden_width: int) -> Any:
    """A Batch with zero-stride placeholder states: enough for ``count_supervised`` (no target run)."""
    from .trainer import Batch

    b, n = m.shifted.input_ids.shape
    zero = torch.zeros(())
    return Batch(
        input_ids=m.shifted.input_ids,
        aux_hidden=zero.expand(b, n, aux_width),
        loss_mask=m.shifted.loss_mask,
        document_ids=m.shifted.document_ids,
        target_hidden=zero.expand(b, n, hidden_width),
        cod_seeds=m.seeds,
        position_ids=m.shifted.position_ids,
    )


def _full_batch(m: _Micro, source: Any, device: torch.device) -> Any:
    """Run the target (or read the cache) on the packed rows and build the shifted Batch."""
    from .data import eagle_shift
    from .trainer import Batch

    aux, final = source.states(m.packed)
    p = m.packed
    sh = eagle_shift(
        p.input_ids.to(aux.device),
        p.loss_mask.to(aux.device),
        p.document_ids.to(aux.device),
        aux,
        final,
        example_index=p.example_index.to(aux.device),
    )
    return Batch(
        input_ids=sh.input_ids,
        aux_hidden=sh.aux_hidden,
        loss_mask=sh.loss_mask,
        document_ids=sh.document_ids,
        target_hidden=sh.final_hidden,
        cod_seeds=m.seeds.to(aux.device),
        position_ids=sh.position_ids,
    ).to(device)


# ---------------------------------------------------------------------------------------------
# model construction


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _vocab_and_mask(cfg: Config, prepared: Any, tokenizer_len: int, vocab_size: int) -> tuple[Any, int]:
    """Draft vocabulary and mask token: the ones recorded by ``peagle prepare`` unless overridden."""
    from .vocab import DraftVocab, build_draft_vocab, check_mask_token

    rec = read_draft_choice(prepared.path)
    size = cfg.model.draft_vocab_size or rec.get("draft_vocab_size") or vocab_size
    if size > vocab_size:
        raise ConfigError(f"model.draft_vocab_size {size} exceeds the target vocab ({vocab_size})")
    counts = prepared.supervised_counts[:vocab_size]
    counts = torch.nn.functional.pad(counts, (0, vocab_size - counts.numel()))
    vocab: DraftVocab = build_draft_vocab(counts, size)
    mask = cfg.model.mask_token_id
    if mask == "auto":
        mask = rec.get("mask_token_id")
        if mask is None:  # prepared without a recorded choice: first id the tokenizer never produces
            if tokenizer_len >= vocab_size:
                raise ConfigError(
                    "model.mask_token_id: auto found no free embedding row; set it explicitly "
                    "(an id that never occurs in the data), or record one with peagle prepare"
                )
            mask = tokenizer_len
    try:
        mask = check_mask_token(int(mask), vocab_size, prepared.all_counts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return vocab, mask


DRAFT_CHOICE = "draft_vocab.json"


def read_draft_choice(prepared_dir: str | Path) -> dict[str, Any]:
    """The draft vocab size and mask token recorded by ``peagle prepare`` (empty if none)."""
    path = Path(prepared_dir) / DRAFT_CHOICE
    return json.loads(path.read_text()) if path.is_file() else {}


def _build(
    cfg: Config, d: _Dist, vocab: Any, mask: int, cache: Any, need_target_on_device: bool
) -> tuple[Any, Any, Any]:
    """(target, draft, state source): the source is the target (online) or the cache (offline)."""
    from transformers import AutoTokenizer

    from .draft import DraftConfig, PEagleDraft
    from .target import Target, TargetError, TargetParts, verifier_fingerprint

    offline = cfg.data.cache is not None
    try:
        if offline and not need_target_on_device:  # states come from the cache: no decoder layers needed
            target = TargetParts(cfg.model.target, aux_layer_ids=cfg.model.aux_layer_ids,
                                 dtype=_dtype(cfg.model.target_dtype, torch.device("cpu")),
                                 trust_remote_code=cfg.model.trust_remote_code)
        else:
            target = Target(
                cfg.model.target,
                aux_layer_ids=cfg.model.aux_layer_ids,
                device=d.device,
                dtype=_dtype(cfg.model.target_dtype, d.device),
                trust_remote_code=cfg.model.trust_remote_code,
            )
    except TargetError as e:
        raise ConfigError(f"model.target: {e}") from None
    if target.vocab_size != vocab.t2d.numel():
        raise ConfigError(f"model.target: lm_head has {target.vocab_size} rows but the config says {vocab.t2d.numel()}")
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    dcfg = DraftConfig.from_target(
        target.hf_config,
        mask_token_id=mask,
        num_hidden_layers=m.num_layers,
        draft_vocab_size=vocab.size,
        norm_before_residual=m.norm_before_residual,
        norm_before_fc=m.norm_before_fc,
        fc_norm=m.fc_norm,
        norm_output=m.norm_output,
        aux_layer_ids=list(target.aux_layer_ids),
        num_speculative_tokens=m.num_depths,
        verifier_name_or_path=m.target_name or str(Path(m.target).resolve()),  # a path vLLM can open
        verifier_fingerprint=verifier_fingerprint(target, AutoTokenizer.from_pretrained(
            cfg.model.target, trust_remote_code=cfg.model.trust_remote_code)),
    )
    draft = PEagleDraft(dcfg)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    if m.init_embed_from_target:
        emb = target.embed_weight.float().cpu()
        draft.init_embed_tokens_from_target(emb)
    if m.init_lm_head_from_target:
        draft.init_lm_head_from_target(target.lm_head_weight.float().cpu())
    if m.freeze_lm_head:
        draft.freeze_lm_head()
    draft.gradient_checkpointing = m.activation_checkpointing
    if cache is not None and d.device.type == "cpu":
        cache.dtype = torch.float32  # bf16 on disk; the CPU path trains in fp32
    source = cache if cache is not None else target
    return target, draft, source


def _param_groups(draft: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in draft.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name != "mask_hidden" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------------------------------
# logging


class _Logger:
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
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge what a previous process logged past the checkpoint (steps > start), keep step start
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None
        if cfg.train.progress:
            from tqdm.auto import tqdm

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


# ---------------------------------------------------------------------------------------------
# signals


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, saves and exits. A second signal aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if _in_main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop now
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# validation and acceptance


@torch.no_grad()
def _validate(trainer: Any, data: _Data, source: Any, cfg: Config, d: _Dist, autocast: Any) -> dict[str, float]:
    from .trainer import StepMetrics

    was_training = trainer.training
    trainer.eval()
    total = StepMetrics.zeros(cfg.model.num_depths)
    mb = cfg.train.micro_batch_size
    mine = data.val_rows[d.rank :: d.world]
    for i in range(0, len(mine), mb):
        m = _micro(data, mine[i : i + mb], cfg.train.seed, VAL_EPOCH)
        batch = _full_batch(m, source, d.device)
        with autocast():
            out = trainer(batch)
        total = total + out.metrics
    trainer.train(was_training)
    packed = _all_reduce(total.as_tensor().to(d.device), d).cpu()
    return StepMetrics.from_tensor(packed).summary()


# ---------------------------------------------------------------------------------------------
# the loop


# Resuming with a changed config. FREE keys (how long, how often, where to log, how to compute
# the same thing) are applied and logged; ACCEPTABLE ones change the optimisation from the resumed
# step and need ``--accept-change KEY``; every other key (the draft's shape and vocabulary, the
# data split and order, initialisation) cannot change on resume.
RESUME_FREE = frozenset({
    "train.max_steps", "train.epochs", "train.save_every", "train.keep_last", "train.eval_every",
    "train.log_every", "train.progress", "train.tensorboard", "train.output_dir", "train.on_nonfinite",
    "train.device", "model.sequence_partitions", "model.activation_checkpointing", "model.target_name",
    "model.trust_remote_code", "eval.enabled", "eval.prompts", "eval.num_prompts", "eval.max_new_tokens",
})
RESUME_ACCEPTABLE = frozenset({
    "optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.warmup_steps", "optim.min_lr_ratio",
    "optim.grad_clip", "model.ratio", "model.ratio_min", "model.max_anchors", "model.target",
    "model.target_dtype", "data.cache", "train.micro_batch_size", "train.grad_accum", "train.dtype",
})


def _why_fixed(key: str) -> str:
    """Why ``key`` cannot change on resume."""
    if key.startswith("data."):
        return "the data position refers to the old split and packing"
    if key == "train.seed":
        return "epoch orders and COD samples come from the seed"
    if key.startswith("model.init_"):
        return "it only acts when a run starts"
    return "the checkpoint fixes the draft's shape, vocabulary and trained parameters"


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every key of ``new`` whose value differs from ``old``.

    A key missing from ``old`` (a config written before the key existed) counts as its default.
    """
    import dataclasses

    from .config import SECTIONS

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
    from .config import _suggest, all_keys

    keys: set[str] = set()
    valid = set(all_keys())
    for item in items:
        for key in (k.strip() for k in item.split(",")):
            if not key:
                continue
            if key not in valid:
                raise ConfigError(f"--accept-change: unknown key '{key}'{_suggest(key)}")
            if key not in RESUME_FREE and key not in RESUME_ACCEPTABLE:
                raise ConfigError(
                    f"--accept-change {key}: {key} cannot change on resume ({_why_fixed(key)}); "
                    "train it in a new train.output_dir"
                )
            keys.add(key)
    return keys


def _resume_changes(old: dict[str, Any], cfg: Config, accepted: set[str], ckpt: Path, step: int) -> list[str]:
    """The config changes a resume applies (as log lines), or :class:`ConfigError` listing refused ones."""
    changes = _config_changes(old, config_to_dict(cfg))
    applied, need, fixed = [], [], []
    for key, a, b in changes:
        text = f"{key} {_show(a)} → {_show(b)}"
        if key in RESUME_FREE or (key in RESUME_ACCEPTABLE and key in accepted):
            applied.append(text)
        elif key in RESUME_ACCEPTABLE:
            need.append((key, text))
        else:
            fixed.append((key, f"{text} (cannot change on resume: {_why_fixed(key)})"))
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


def _check_resume_vocab(ckpt: Path, vocab: Any, mask: int, cfg: Config) -> None:
    """Refuse resuming a checkpoint whose draft vocabulary or mask token differ from this dataset's."""
    from safetensors import safe_open

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


def _owned_by_run(name: str) -> bool:
    """Whether ``name`` (an entry of train.output_dir) is something a peagle run writes."""
    import re

    return (
        name in RUN_FILES
        or re.fullmatch(r"step-\d+(\.tmp|\.replaced)?", name) is not None
        or name.startswith((f".{FINAL_DIR}.tmp-", f".{FINAL_DIR}.old-"))
    )


def _check_output_dir(out: Path, has_checkpoints: bool) -> None:
    """A fresh run refuses a directory holding what it did not write; ``final/`` must be an export."""
    from .export import is_previous_export

    if not has_checkpoints:
        foreign = foreign_entries(out, _owned_by_run)
        if foreign:
            raise ConfigError(
                f"train.output_dir {out} is not empty and is not a peagle run directory (it holds "
                f"{describe_entries(foreign, out)}); choose a new or empty directory"
            )
    final = out / FINAL_DIR
    if final.exists() and not (final.is_dir() and (not any(final.iterdir()) or is_previous_export(final))):
        what = describe_entries([p.name for p in final.iterdir()], final) if final.is_dir() else "a file"
        raise ConfigError(
            f"train.output_dir {out}: {final} is not a peagle export ({what}); the export at the end of "
            "training would replace it: move it away first"
        )


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


def write_report(out: str | Path, cfg: Config, result: TrainResult, draft_config: Any) -> Path:
    """``report.md`` + training PNGs (``peagle.plots.training_plots``) in the run directory; returns the report."""
    from . import plots

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


def _global_step_rows(data: _Data, epoch: int, row: int) -> list[list[int]]:
    return data.epoch_rows(epoch)[row : row + data.rows_per_step]


def _rank_micro_rows(step_rows: list[list[int]], j: int, rank: int, world: int, mb: int) -> list[list[int]]:
    start = (j * world + rank) * mb
    return step_rows[start : start + mb]


def _positions(data: _Data, state: TrainState, total: int) -> Iterator[tuple[int, int]]:
    """(epoch, row_in_epoch) of every remaining step."""
    epoch, row = state.epoch, state.row_in_epoch
    for _ in range(state.step, total):
        if row + data.rows_per_step > len(data.epoch_rows(epoch)):
            epoch, row = epoch + 1, 0
        yield epoch, row
        row += data.rows_per_step


@contextlib.contextmanager
def _own_gradient(params: list[Tensor], enabled: bool = True) -> Iterator[None]:
    """Inside the block ``.grad`` starts empty; on exit the gradients held before are added to it.

    A partitioned micro-batch's gradient is the sum of several backward passes (its units). Summed
    straight into ``.grad`` after the earlier micro-batches, the step's gradient would be rounded as
    ((G + u₀) + u₁) + c, whereas a split of the same step over ranks rounds it as G + ((u₀ + u₁) + c)
    (the all-reduce adds each rank's own sum). In fp32 the two differ by ~1e-7 relative; AdamW turns
    that into a visible weight difference wherever a gradient nearly cancels (update lr·g/(|g| + eps)).
    Forming each micro-batch's gradient apart gives one process the ranks' rounding (1 process × 2
    micro-batches = 2 ranks × 1, bit for bit, as without partitions). Costs one extra gradient buffer.
    """
    if not enabled:
        yield
        return
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, before, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else g.add_(p.grad)


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


def train(
    cfg: Config,
    resume: str | None = None,
    *,
    stop_after: int | None = None,
    accept_changes: list[str] | tuple[str, ...] = (),
) -> TrainResult:
    """Run (or continue) the training described by ``cfg``; returns a :class:`TrainResult`.

    ``resume``: a checkpoint path, an output dir, or ``"auto"`` (the newest complete checkpoint of
    ``train.output_dir``; none = start fresh). ``stop_after``: behave as if interrupted after that
    many total steps (tests and time-boxed jobs): checkpoint, no export, ``interrupted=True``.
    ``accept_changes``: config keys allowed to differ from the resumed checkpoint's (see
    ``RESUME_ACCEPTABLE``); they take effect from the resumed step. Other differences are refused.
    The output directory is locked for the whole run (a second run on it refuses).
    """
    out = Path(cfg.train.output_dir)
    # -- cheap checks first: nothing heavy runs on a config or checkpoint that will be refused
    if cfg.eval.prompts is not None and not Path(cfg.eval.prompts).is_file():
        raise ConfigError(f"eval.prompts: file not found: {cfg.eval.prompts}")
    if not (Path(cfg.model.target) / "config.json").is_file():
        raise ConfigError(f"model.target: {cfg.model.target} is not a model directory (no config.json)")
    check_output_dir(out, "train.output_dir")
    accepted = parse_accept_changes(list(accept_changes))
    lock = RunLock(out, "train.output_dir") if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        with contextlib.nullcontext() if cfg.train.progress else quiet_hf_progress():
            return _train_locked(cfg, out, resume, stop_after, accepted)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    cfg: Config, out: Path, resume: str | None, stop_after: int | None, accepted: set[str]
) -> TrainResult:
    from .data import DataError, load_prepared

    ckpt = resolve_resume(resume, out) if resume else None
    if resume is None and list_checkpoints(out):
        raise ConfigError(
            f"train.output_dir {out} already holds checkpoints; pass --resume auto to continue, "
            "or choose another output directory"
        )
    _check_output_dir(out, has_checkpoints=bool(list_checkpoints(out)))
    applied: list[str] = []
    if ckpt is not None:
        step = int(json.loads((ckpt / "trainer_state.json").read_text()).get("step", 0))
        applied = _resume_changes(load_config_dict(ckpt), cfg, accepted, ckpt, step)
    elif accepted:
        print("note: --accept-change has no effect: there is no checkpoint to resume (a fresh run)", flush=True)
    try:
        prepared = load_prepared(cfg.data.dataset)
    except DataError as e:
        raise ConfigError(f"data.dataset: {e}") from None
    vocab_size, num_layers = _target_shape(cfg)
    prepared_vocab = prepared.manifest.get("vocab_size")
    if prepared_vocab is not None and int(prepared_vocab) != vocab_size:
        raise ConfigError(
            f"data.dataset {cfg.data.dataset} was prepared for a vocabulary of {prepared_vocab} tokens, but "
            f"model.target {cfg.model.target} has {vocab_size}: prepare it with this target"
        )
    try:  # tokenized by this target's tokenizer? (class, length, vocabulary sha256, chat template)
        from .data import check_dataset_matches_target

        check_dataset_matches_target(prepared.manifest, cfg.model.target, dataset=cfg.data.dataset,
                                     trust_remote_code=cfg.model.trust_remote_code)
    except DataError as e:
        raise ConfigError(f"data.dataset: {e}") from None
    tok_len = int((prepared.manifest.get("tokenizer") or {}).get("len") or vocab_size)
    vocab, mask = _vocab_and_mask(cfg, prepared, tok_len, vocab_size)
    if ckpt is not None:
        _check_resume_vocab(ckpt, vocab, mask, cfg)
    cache = _open_cache(cfg, prepared, num_layers)

    d = _init_distributed(cfg.train.device)
    try:
        return _run(cfg, d, prepared, out, ckpt, stop_after, (vocab, mask, cache), applied)
    finally:
        if d.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _target_shape(cfg: Config) -> tuple[int, int]:
    """(vocab size, layers) of the target from its config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    try:
        tc = AutoConfig.from_pretrained(cfg.model.target, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.target: cannot read {cfg.model.target}/config.json: {first}") from None
    tc = tc.get_text_config() if hasattr(tc, "get_text_config") else tc
    vocab, layers = getattr(tc, "vocab_size", None), getattr(tc, "num_hidden_layers", None)
    if not vocab or not layers:
        raise ConfigError(f"model.target: {cfg.model.target} is not a decoder LM config (no vocab_size/layers)")
    from .target import TargetError, resolve_aux_layer_ids

    try:
        resolve_aux_layer_ids(cfg.model.aux_layer_ids, int(layers))
    except TargetError as e:
        raise ConfigError(f"model.{e}") from None
    return int(vocab), int(layers)


def _open_cache(cfg: Config, prepared: Any, num_layers: int) -> Any:
    """The offline state cache (None when online), checked against the dataset and target."""
    if cfg.data.cache is None:
        return None
    from .cache import CachedStates, CacheError
    from .target import resolve_aux_layer_ids

    try:
        cache = CachedStates(cfg.data.cache)
    except CacheError as e:
        raise ConfigError(f"data.cache: {e}") from None
    aux = resolve_aux_layer_ids(cfg.model.aux_layer_ids, num_layers)
    if len(cache) != len(prepared) or tuple(cache.aux_layer_ids) != aux:
        raise ConfigError(
            f"data.cache {cfg.data.cache} was built for another dataset or target ({len(cache)} examples, "
            f"aux layers {list(cache.aux_layer_ids)}; expected {len(prepared)}, {list(aux)})"
        )
    return cache


def _apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: Any, o: Any, step: int, total: int) -> float:
    """After a resume: this config's AdamW settings and lr schedule from ``step`` on; returns the lr used next.

    A checkpoint's optimizer and scheduler states carry the old run's lr, betas, eps and weight
    decay; without this they would silently win over the config. Unchanged values give exactly the
    numbers LambdaLR would have produced (``base_lr * factor(step)``), so exact resume is kept.
    """
    factor = lr_factor(step, total, o.warmup_steps, o.min_lr_ratio)
    for i, g in enumerate(optimizer.param_groups):
        g["initial_lr"] = o.lr
        g["betas"] = tuple(o.betas)
        g["eps"] = o.eps
        g["weight_decay"] = o.weight_decay if i == 0 else 0.0
        g["lr"] = o.lr * factor
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return float(optimizer.param_groups[0]["lr"])


def _grad_norm(params: list[Tensor], clip: float | None) -> float:
    """Global gradient norm (clipping to ``clip`` when set)."""
    if clip is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads))


def _run(
    cfg: Config,
    d: _Dist,
    prepared: Any,
    out: Path,
    ckpt: Path | None,
    stop_after: int | None,
    pre: tuple,
    applied: list[str] | None = None,
) -> TrainResult:
    from .trainer import PEagleTrainer, StepMetrics

    t_cfg, m_cfg = cfg.train, cfg.model
    rows_per_step = d.world * t_cfg.grad_accum * t_cfg.micro_batch_size
    data = _Data(cfg, prepared, rows_per_step)
    al_prompts = (cfg.eval.prompts or data.heldout_prompts(cfg.eval.num_prompts)) if cfg.eval.enabled else None
    want_al = bool(al_prompts)
    vocab, mask, cache = pre
    target, draft, source = _build(cfg, d, vocab, mask, cache, need_target_on_device=want_al)
    head = target.head(vocab.t2d)
    if source is not target and not want_al:
        target = None  # offline: the head is all we need from the target
    draft.to(d.device)
    trainer = PEagleTrainer(
        draft,
        num_depths=m_cfg.num_depths,
        ratio=m_cfg.ratio,
        ratio_min=m_cfg.ratio_min,
        max_anchors=m_cfg.max_anchors,
        sequence_partitions=m_cfg.sequence_partitions,
        target_head=head.to(d.device),
    )
    model: nn.Module = trainer
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters: a partition's last unit (the depth-0 stream) does not touch lm_head /
        # mask_hidden; their no_sync-accumulated gradients are still all-reduced then.
        model = DDP(
            trainer,
            device_ids=[d.local_rank] if d.device.type == "cuda" else None,
            find_unused_parameters=True,
            **_no_buffer_sync(),
        )
        model.register_comm_hook(None, _sum_hook)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        _param_groups(draft, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True
    )
    if t_cfg.max_steps is not None:
        total = t_cfg.max_steps
    else:
        total = sum(data.steps_in_epoch(e) for e in range(t_cfg.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, o.warmup_steps, o.min_lr_ratio)
    )

    state = TrainState(rows_per_step=rows_per_step, world_size=d.world)
    next_lr = None
    if ckpt is not None:
        state, rngs = load_checkpoint(ckpt, model=draft, optimizer=optimizer, verify=False)
        scheduler.load_state_dict(state.scheduler)
        next_lr = _apply_optim_config(optimizer, scheduler, o, state.step, total)
        restore_rng(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
        if state.rows_per_step != rows_per_step:
            state.row_in_epoch = (state.row_in_epoch // rows_per_step) * rows_per_step
        state.rows_per_step, state.world_size = rows_per_step, d.world
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    logger = _Logger(cfg, out, total, state.step, d.main)
    if ckpt is not None:
        logger.write(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch})")
        for change in applied or []:
            logger.write(f"config change applied from step {state.step + 1}: {change}")
        if applied:
            logger.write(
                f"lr of step {state.step + 1}: {next_lr:.6g} (optim.lr {o.lr:g} × schedule factor "
                f"{lr_factor(state.step, total, o.warmup_steps, o.min_lr_ratio):.4g}, {total} steps in all)"
            )

    use_autocast = _dtype(t_cfg.dtype, d.device) == torch.bfloat16

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if not use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(d.device.type, dtype=torch.bfloat16)

    aux_w = draft.config.fc_in_features
    hid_w = draft.config.target_hidden_size
    cs = None
    result = TrainResult(step=state.step, total_steps=total, interrupted=False, output_dir=out)
    last_saved = state.step if ckpt is not None else -1
    params = [p for p in draft.parameters() if p.requires_grad]
    config_dict = config_to_dict(cfg)
    skipped = int(state.extra.get("nonfinite_skipped", 0))

    def newest_checkpoint() -> str:
        existing = list_checkpoints(out)
        return str(existing[-1][1]) if existing else "none yet"

    def save() -> Path | None:
        nonlocal last_saved
        bad = [n for n, p in draft.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # never let a non-finite draft rotate good checkpoints out
            raise NonFiniteError(
                f"non-finite weights ({', '.join(bad[:3])}) after step {state.step}: not saved; "
                f"the newest checkpoint is {newest_checkpoint()}; lower optim.lr"
            )
        state.scheduler = scheduler.state_dict()
        rng = capture_rng()
        if d.active:
            gathered: list[Any] = [None] * d.world
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        path = None
        if d.main:
            path = save_checkpoint(
                out,
                state,
                model=draft,
                optimizer=optimizer,
                rng_states=gathered,
                config=config_dict,
                keep_last=t_cfg.keep_last,
            )
            logger.write(f"saved checkpoint {path}")
        if d.active:
            dist.barrier()
        last_saved = state.step
        return path

    def evaluate_now() -> dict[str, float]:
        nonlocal cs
        rec: dict[str, Any] = {"step": state.step, "split": "val"}
        if data.val_rows:
            rec.update(_validate(trainer, data, source, cfg, d, autocast))
        if want_al and d.main:
            from .evaluate import ContinuationSet, acceptance_on

            if cs is None:
                cs = ContinuationSet.prepare(
                    target, al_prompts, cfg.eval.max_new_tokens, limit=cfg.eval.num_prompts,
                    lookahead=m_cfg.num_depths - 1, progress=False,
                )
            acc = acceptance_on(draft, cs, m_cfg.num_depths)
            rec["acceptance_length"] = float(acc["acceptance_length"])
            for k, v in acc["acceptance_length_by_k"].items():
                rec[f"al_k{k}"] = float(v)
            for i, r in enumerate(acc.get("per_position", [])):
                rec[f"accept_pos{i + 1}"] = float(r)
        if d.active:
            dist.barrier()
        if len(rec) <= 2:
            return {}
        logger.log(rec, "val")
        shown = {k: round(v, 4) for k, v in rec.items() if k in ("loss", "acc", "acceptance_length")}
        logger.write(f"step {state.step} validation: {shown}")
        return rec

    trainer.train()
    try:
        with _StopFlag() as stop:
            for epoch, row in _positions(data, state, total):
                t_start = time.perf_counter()
                step_rows = _global_step_rows(data, epoch, row)
                mb = t_cfg.micro_batch_size
                micro = [
                    _micro(data, _rank_micro_rows(step_rows, j, d.rank, d.world, mb), t_cfg.seed, epoch)
                    for j in range(t_cfg.grad_accum)
                ]
                local_count = sum(trainer.count_supervised(_count_batch(m, aux_w, hid_w)) for m in micro)
                count = _all_reduce(torch.tensor([float(local_count)], dtype=torch.float64, device=d.device), d)
                normalizer = float(max(count.item(), 1.0))
                metrics = StepMetrics.zeros(m_cfg.num_depths)
                loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
                tokens = 0
                for j, m in enumerate(micro):
                    batch = _full_batch(m, source, d.device)
                    tokens += m.tokens
                    last_micro = j == len(micro) - 1
                    if m_cfg.sequence_partitions == 1:
                        units: list[Any] = [None]
                        plan = None
                    else:
                        with autocast():
                            plan = trainer.plan(batch)
                        units = list(range(len(plan.units)))
                    # one process: a micro-batch's units sum apart, then join the step's gradient, as
                    # the all-reduce adds each rank's (which DDP does inside the step's last backward)
                    with _own_gradient(params, enabled=not d.active and j > 0 and len(units) > 1):
                        for u in units:
                            last = last_micro and u == units[-1]
                            sync = contextlib.nullcontext() if (last or not d.active) else model.no_sync()
                            with sync:
                                with autocast():
                                    res = (
                                        model(batch, normalizer)
                                        if plan is None
                                        else model(batch, normalizer, segment=(plan, u))
                                    )
                                res.loss.backward()
                            loss_sum += res.loss.detach().double()
                            metrics = metrics + res.metrics
                    del batch, plan
                grad_norm = _grad_norm(params, o.grad_clip)  # global: DDP gradients are already reduced
                step_loss = float(_all_reduce(loss_sum.reshape(1), d).item())
                lr = optimizer.param_groups[0]["lr"]
                nonfinite = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
                if nonfinite:
                    what = f"loss ({step_loss})" if not math.isfinite(step_loss) else f"gradient norm ({grad_norm})"
                    optimizer.zero_grad(set_to_none=True)
                    if t_cfg.on_nonfinite == "stop":
                        raise NonFiniteError(
                            f"non-finite {what} at step {state.step + 1} (epoch {epoch}): stopped before the "
                            f"update, nothing of it was saved (newest checkpoint: {newest_checkpoint()}); lower "
                            "optim.lr or check the data, or set train.on_nonfinite: skip to skip such steps"
                        )
                    skipped += 1
                    state.extra["nonfinite_skipped"] = skipped
                    logger.write(
                        f"step {state.step + 1}: non-finite {what}: skipped (no optimizer update; "
                        f"{skipped} skipped so far)"
                    )
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.epoch, state.row_in_epoch = epoch, row + rows_per_step
                if state.row_in_epoch + rows_per_step > len(data.epoch_rows(epoch)):
                    state.epoch, state.row_in_epoch = epoch + 1, 0
                stop_now = stop.signum is not None or (stop_after is not None and state.step >= stop_after)
                extra = torch.tensor([float(tokens), float(stop_now)], dtype=torch.float64)
                packed = torch.cat([metrics.as_tensor().reshape(-1), extra])
                packed = _all_reduce(packed.to(d.device), d).cpu()
                k = m_cfg.num_depths
                summary = StepMetrics.from_tensor(packed[: 3 * k].reshape(3, k)).summary()
                now = time.perf_counter()
                record = {
                    "step": state.step,
                    "epoch": epoch,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "skipped": nonfinite,
                    "tokens": int(packed[3 * k]),
                    "step_s": now - t_start,
                    "tokens_per_s": float(packed[3 * k]) / max(now - t_start, 1e-9),
                    **{kk: v for kk, v in summary.items() if not kk.startswith("n_")},
                }
                result.last_metrics = record
                if state.step % t_cfg.log_every == 0 or state.step == total:
                    logger.log(record, "train")
                logger.progress(record, k)
                stop_now = bool(packed[3 * k + 1] > 0)
                if t_cfg.eval_every and state.step % t_cfg.eval_every == 0 and state.step < total and not stop_now:
                    result.last_val = evaluate_now()
                if stop_now:
                    result.interrupted = True
                    break
                if t_cfg.save_every and state.step % t_cfg.save_every == 0 and state.step < total:
                    result.checkpoint = save()
            result.step = state.step
            if result.interrupted:
                logger.write(f"interrupted at step {state.step}: saving a checkpoint")
            if state.step != last_saved:
                result.checkpoint = save()
            if not result.interrupted:
                result.last_val = evaluate_now() or result.last_val
                if d.main:
                    from .export import export_draft

                    result.export_dir = export_draft(draft, out / FINAL_DIR, overwrite=True)
                    logger.write(f"exported the draft to {result.export_dir}")
                    if result.checkpoint is None:
                        existing = list_checkpoints(out)
                        result.checkpoint = existing[-1][1] if existing else None
                    result.skipped_steps = skipped
                    result.report = write_report(out, cfg, result, draft.config)
                    logger.write(f"report: {result.report}")
                if d.active:
                    dist.barrier()
    finally:
        logger.close()
    result.skipped_steps = skipped
    if result.checkpoint is None:
        existing = list_checkpoints(out)
        result.checkpoint = existing[-1][1] if existing else None
    return result
