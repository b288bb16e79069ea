"""The training loop: data → target states → P-EAGLE steps, single process or under ``torchrun``.

Read top to bottom: `train` (checks, lock) → `build` (a `Run`: data, draft, trainer, optimizer, state)
→ `train_loop` (the loop, one screen) delegating to `train_step`, `validate` and `save`.

One optimizer step consumes ``G = world_size × grad_accum × micro_batch_size`` packed rows of the
current epoch (`data.loader.TrainData`), so the union of a step's rows depends only on G. The loss of
every forward is its KL sum divided by ONE count: the supervised COD elements of the whole optimizer
step (counted from each micro-batch's COD layout before the target runs, all-reduced over ranks).
Gradients are summed over ranks (`distributed.wrap`: DDP, or FSDP2 with ``train.parallel: fsdp``), so
W ranks × A micro-batches give the gradient of one process on the union batch. Exact resume: a
checkpoint holds the draft, AdamW moments, scheduler, RNG states and the data position;
SIGINT/SIGTERM finish the step, save, and ``peagle train`` exits 130 (docs/training.md). Streamed target
states (``data.states: stream``) are taken before a step's first forward; when they cannot be had (after the
stream's retries), every rank stops before that step, a checkpoint is saved and one line says so
(docs/large-targets.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peagle.config.training import Config, ConfigError, config_to_dict
from peagle.eval.continuations import ContinuationSet
from peagle.eval.tables import acceptance_on
from peagle.model.loss import loss_divisor
from peagle.model.step import StepMetrics
from peagle.run.build import Run, build
from peagle.run.distributed import (
    Dist,
    all_reduce,
    barrier,
    full_optimizer_state,
    gather_objects,
    is_sharded,
    local_shard,
    sync_unless,
)
from peagle.run.loader import MicroBatch
from peagle.run.optim import grad_norm
from peagle.run.resume import parse_accept_changes
from peagle.run.runlog import quiet_hf_progress, write_report
from peagle.store.checkpoint import capture_rng, save_checkpoint
from peagle.store.export import export_draft
from peagle.store.rundir import FINAL_DIR, RunLock, check_output_dir
from peagle.target.stream import StreamError
from peagle.util.machine import keep_freed_memory

__all__ = ["TrainResult", "NonFiniteError", "Run", "build", "train", "train_loop", "train_step", "validate",
           "save", "INTERRUPTED_EXIT_CODE"]  # Run and build: peagle.run.build

INTERRUPTED_EXIT_CODE = 130
VAL_EPOCH = -1  # COD seed "epoch" of the validation split: the same sample at every evaluation


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
    stream: dict[str, Any] = field(default_factory=dict)  # data.states stream: the stream's statistics


# ---------------------------------------------------------------------------------------------
# entry point


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
    ``resume.RESUME_ACCEPTABLE``); they take effect from the resumed step. Other differences are refused.
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
    keep_freed_memory()  # each step reuses the last step's memory instead of faulting it in again
    try:
        with contextlib.nullcontext() if cfg.train.progress else quiet_hf_progress():
            run = build(cfg, resume, accepted)
            try:
                return train_loop(run, stop_after)
            finally:
                if getattr(run.source, "streamed", False):
                    run.source.close()
                run.logger.close()
                run.d.close()
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------------------------
# the loop


def train_loop(run: Run, stop_after: int | None = None) -> TrainResult:
    """Steps until ``run.total`` (or a signal / ``stop_after``), validating and saving on schedule, then
    the final checkpoint and, unless interrupted, the final validation, export and report."""
    t, state, logger = run.cfg.train, run.state, run.logger
    result = TrainResult(step=state.step, total_steps=run.total, interrupted=False, output_dir=run.out)
    run.trainer.train()
    failure: StreamError | None = None
    with _StopFlag() as stop:
        try:
            for epoch, row in run.data.positions(state, run.total):
                record = train_step(run, epoch, row)
                result.last_metrics = record
                if state.step % t.log_every == 0 or state.step == run.total:
                    logger.log(record, "train")
                logger.progress(record, run.trainer.num_depths)
                stop_here = stop.signum is not None or (stop_after is not None and state.step >= stop_after)
                if _any_rank(stop_here, run.d):
                    result.interrupted = True
                    break
                if t.eval_every and state.step % t.eval_every == 0 and state.step < run.total:
                    result.last_val = validate(run)
                if t.save_every and state.step % t.save_every == 0 and state.step < run.total:
                    result.checkpoint = save(run)
        except StreamError as e:  # the streamed target states failed (after their retries) or stalled
            failure = e
    result.step, result.skipped_steps = state.step, state.skipped_steps
    if getattr(run.source, "streamed", False):
        result.stream = _stream_summary(run)
    if failure is not None:
        _stream_failed(run, failure)
    if result.interrupted:
        logger.write(f"interrupted at step {state.step}: saving a checkpoint")
    if state.step != run.last_saved:
        result.checkpoint = save(run)
    result.checkpoint = result.checkpoint or run.newest_checkpoint()
    if not result.interrupted:
        try:
            _finish(run, result)
        except StreamError as e:  # the final validation's streamed states: everything trained is saved
            raise StreamError(f"{e} — in the final validation; all {run.total} steps are trained and saved "
                              f"({result.checkpoint}): continue with --resume auto to validate and export") from None
    return result


def _stream_summary(run: Run) -> dict[str, Any]:
    """The stream's statistics (this rank), logged in one line."""
    s = run.source.stats.as_dict()
    run.logger.write(f"streamed target states: {s['micro_batches']} micro-batches ({s['tokens']} tokens), "
                     f"{s['extract_calls']} extraction calls in {s['extract_s']:.1f} s, training waited "
                     f"{s['wait_s']:.1f} s; staging area peak {s['peak_bytes'] / 2**20:.2f} MiB "
                     f"({s['peak_micro_batches']} micro-batches); {s['retries']} retries")
    return s


def _stream_failed(run: Run, failure: StreamError) -> None:
    """The target states could not be had: save what is trained (a resumable checkpoint), then raise one line."""
    run.optimizer.zero_grad(set_to_none=True)
    state = run.state
    ckpt = None
    if state.step > 0:
        run.logger.write(f"target states failed before step {state.step + 1}: saving a checkpoint")
        ckpt = save(run) if state.step != run.last_saved else run.newest_checkpoint()
        ckpt = ckpt or run.newest_checkpoint()
    where = (f"checkpoint {ckpt} at step {state.step}; bring the engine or servers back and continue with "
             "--resume auto" if ckpt is not None else "no step was trained; start the run again")
    raise StreamError(f"{failure} — training stopped before step {state.step + 1}/{run.total}; {where}")


def _finish(run: Run, result: TrainResult) -> None:
    """The end of a complete run: final validation, the export to ``final/`` and report.md (rank 0)."""
    result.last_val = validate(run) or result.last_val
    draft = run.full_draft()
    if draft is not None:  # rank 0
        result.export_dir = export_draft(draft, run.out / FINAL_DIR, overwrite=True)
        run.logger.write(f"exported the draft to {result.export_dir}")
        result.report = write_report(run.out, run.cfg, result, run.draft.config)
        run.logger.write(f"report: {result.report}")
    barrier(run.d)


def _any_rank(flag: bool, d: Dist) -> bool:
    """``flag`` of any rank (a signal reaches one rank; all must stop after the same step)."""
    return bool(all_reduce(torch.tensor([float(flag)], dtype=torch.float64, device=d.device), d).item() > 0)


# ---------------------------------------------------------------------------------------------
# one optimizer step


def train_step(run: Run, epoch: int, row: int) -> dict[str, Any]:
    """One optimizer step over the step's rows at (epoch, row); returns its metrics record.

    Every micro-batch is shifted and COD-sampled once (`layout`), counted from that layout, and run
    unit by unit (one unit, or the S + 1 units of sequence partitioning) with ``no_sync`` on every
    backward but the step's last. A non-finite loss or gradient stops the run (or skips the update,
    ``train.on_nonfinite: skip``) before anything is applied.
    """
    cfg, d, state = run.cfg, run.d, run.state
    t_start = time.perf_counter()
    micro = [run.data.micro_batch(rows, epoch) for rows in run.data.step_micro_rows(epoch, row, d.rank, d.world)]
    layouts = [run.trainer.layout(m.batch) for m in micro]
    states, failed, waited = _take_streamed(run, micro)
    k = run.trainer.num_depths
    per_depth = sum((lay.supervised_per_depth(k) for lay in layouts), torch.zeros(k, dtype=torch.float64))
    count = all_reduce(torch.cat([per_depth, torch.tensor([float(bool(failed))], dtype=torch.float64)]).to(d.device),
                       d).cpu()
    if count[k].item() > 0:  # every rank stops here, before any collective of the step's backward
        raise StreamError(failed or "another rank could not get its target states")
    normalizer = loss_divisor(count[:k], cfg.model.loss_normalization)
    metrics = StepMetrics.zeros(k)
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for j, (m, lay) in enumerate(zip(micro, layouts, strict=True)):
        batch = m.with_states(run.source, d.device, states[j] if states else None)
        if states:
            states[j] = None  # this micro-batch's states are freed with its batch
        last_micro = j == len(micro) - 1
        # one process: a partitioned micro-batch's units sum apart, then join the step's gradient, as the
        # all-reduce adds each rank's (which DDP does inside the step's last backward)
        own = not d.active and j > 0 and run.trainer.sequence_partitions > 1
        with _own_gradient(run.params, enabled=own):
            for unit, last_unit in _with_last(run.trainer.units(batch, lay)):
                with sync_unless(run.model, skip=not (last_micro and last_unit)):
                    with run.autocast():
                        res = run.model(unit, normalizer)
                    res.loss.backward()
                loss_sum += res.loss.detach().double()
                metrics = metrics + res.metrics
        del batch
    norm = grad_norm(run.params, cfg.optim.grad_clip)  # global: gradients are reduced (FSDP: shards, one norm)
    step_loss = float(all_reduce(loss_sum.reshape(1), d).item())
    lr = run.optimizer.param_groups[0]["lr"]
    skipped = not (math.isfinite(step_loss) and math.isfinite(norm))
    if skipped:
        _nonfinite(run, epoch, f"loss ({step_loss})" if not math.isfinite(step_loss) else f"gradient norm ({norm})")
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.epoch, state.row_in_epoch = run.data.advance(epoch, row)
    packed = torch.cat([metrics.as_tensor().reshape(-1), torch.tensor([float(sum(m.tokens for m in micro))],
                                                                      dtype=torch.float64)])
    packed = all_reduce(packed.to(d.device), d).cpu()
    summary = StepMetrics.from_tensor(packed[: 3 * k].reshape(3, k)).summary()
    seconds = time.perf_counter() - t_start
    return {"step": state.step, "epoch": epoch, "lr": lr, "grad_norm": norm, "skipped": skipped,
            "tokens": int(packed[3 * k]), "step_s": seconds, "tokens_per_s": float(packed[3 * k]) / max(seconds, 1e-9),
            **({"states_wait_s": waited} if states is not None else {}),
            **{kk: v for kk, v in summary.items() if not kk.startswith("n_")}}


def _take_streamed(run: Run, micro: list[MicroBatch]) -> tuple[list[Any] | None, str, float]:
    """With ``data.states: stream``: this step's states, taken from the staging area before any forward (so a
    failure stops every rank at the same point, nothing applied); (states or None, the failure, seconds waited)."""
    if not getattr(run.source, "streamed", False):
        return None, "", 0.0
    t0 = time.perf_counter()
    try:
        return [run.source.take(m.packed) for m in micro], "", time.perf_counter() - t0
    except StreamError as e:
        return [], str(e), time.perf_counter() - t0


def _nonfinite(run: Run, epoch: int, what: str) -> None:
    """A non-finite step: stop before the update (default) or count it as skipped."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.cfg.train.on_nonfinite == "stop":
        raise NonFiniteError(
            f"non-finite {what} at step {run.state.step + 1} (epoch {epoch}): stopped before the update, "
            f"nothing of it was saved (newest checkpoint: {run.newest_checkpoint() or 'none yet'}); lower "
            "optim.lr or check the data, or set train.on_nonfinite: skip to skip such steps"
        )
    run.state.skipped_steps += 1
    run.logger.write(f"step {run.state.step + 1}: non-finite {what}: skipped (no optimizer update; "
                     f"{run.state.skipped_steps} skipped so far)")


def _with_last(items: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs, looking one item ahead."""
    it = iter(items)
    current = next(it, _END)
    while current is not _END:
        following = next(it, _END)
        yield current, following is _END
        current = following


_END = object()


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


# ---------------------------------------------------------------------------------------------
# validation and checkpoints


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Validation loss/accuracy (all ranks) and, on rank 0, the acceptance length vLLM would report."""
    rec: dict[str, Any] = {"step": run.state.step, "split": "val"}
    if run.data.val_rows:
        rec.update(_validation_metrics(run))
    draft = run.full_draft() if run.al_prompts else None  # all ranks join the gather under FSDP
    if draft is not None:  # rank 0
        k = run.trainer.num_depths
        if run.continuations is None:
            run.continuations = ContinuationSet.prepare(
                run.target, run.al_prompts, run.cfg.eval.max_new_tokens, limit=run.cfg.eval.num_prompts,
                lookahead=k - 1, progress=False)
        acc = acceptance_on(draft.to(run.d.device), run.continuations, k)
        rec["acceptance_length"] = float(acc["acceptance_length"])
        rec.update({f"al_k{kk}": float(v) for kk, v in acc["acceptance_length_by_k"].items()})
        rec.update({f"accept_pos{i + 1}": float(r) for i, r in enumerate(acc.get("per_position", []))})
    barrier(run.d)
    if len(rec) <= 2:
        return {}
    run.logger.log(rec, "val")
    shown = {k: round(v, 4) for k, v in rec.items() if k in ("loss", "acc", "acceptance_length")}
    run.logger.write(f"step {run.state.step} validation: {shown}")
    return rec


def _validation_metrics(run: Run) -> dict[str, float]:
    """Loss and accuracy over the validation rows (each rank its share, summed over ranks), unit by unit
    as in training (a partitioned trainer runs a batch only through its units)."""
    was_training = run.trainer.training
    run.trainer.eval()
    total = StepMetrics.zeros(run.trainer.num_depths)
    failed = ""
    for m, counted in _val_micro_batches(run):
        try:
            batch = m.with_states(run.source, run.d.device)
        except StreamError as e:  # streamed states: this rank goes on with zeros (FSDP's forwards are collective)
            failed = failed or str(e)
            batch = m.with_states(run.source, run.d.device, _zero_states(run.source, m.packed))
        for unit in run.trainer.units(batch):
            with run.autocast():
                out = run.trainer(unit)
            if counted:
                total = total + out.metrics
    run.trainer.train(was_training)
    k = run.trainer.num_depths
    packed = torch.cat([total.as_tensor().reshape(-1), torch.tensor([float(bool(failed))], dtype=torch.float64)])
    packed = all_reduce(packed.to(run.d.device), run.d).cpu()
    if packed[-1].item() > 0:  # every rank raises: the loop saves a checkpoint together
        raise StreamError(failed or "another rank could not get its validation states")
    return StepMetrics.from_tensor(packed[: 3 * k].reshape(3, k)).summary()


def _zero_states(source: Any, packed: Any) -> tuple[Tensor, Tensor]:
    """Stand-in states of a streamed batch that could not be had (its metrics are thrown away)."""
    B, n = packed.input_ids.shape
    dtype = source.dtype or torch.bfloat16
    return torch.zeros(B, n, source.aux_width, dtype=dtype), torch.zeros(B, n, source.hidden_size, dtype=dtype)


def _val_micro_batches(run: Run) -> list[tuple[MicroBatch, bool]]:
    """This rank's validation micro-batches, each with whether its metrics count. Under FSDP a forward is
    a collective (it gathers the weights), so every rank runs as many as the rank with the most: the
    others repeat one and drop its metrics."""
    d = run.d
    mine = [(m, True) for m in run.data.val_micro_batches(d.rank, d.world, VAL_EPOCH)]
    if is_sharded(run.model):
        most = max(gather_objects(len(mine), d))
        filler = mine[-1][0] if mine else next(run.data.val_micro_batches(0, d.world, VAL_EPOCH))
        mine += [(filler, False)] * (most - len(mine))
    return mine


def save(run: Run) -> Path | None:
    """Checkpoint the run atomically (rank 0 writes the whole draft and AdamW state, gathered under FSDP;
    every rank's RNG state is kept); refuses a non-finite draft."""
    local = [n for n, p in run.draft.named_parameters() if not bool(torch.isfinite(local_shard(p)).all())]
    bad = sorted({n for names in gather_objects(local, run.d) for n in names})
    if bad:  # never let a non-finite draft rotate good checkpoints out
        raise NonFiniteError(
            f"non-finite weights ({', '.join(bad[:3])}) after step {run.state.step}: not saved; "
            f"the newest checkpoint is {run.newest_checkpoint() or 'none yet'}; lower optim.lr"
        )
    run.state.scheduler = run.scheduler.state_dict()
    rngs = gather_objects(capture_rng(), run.d)
    draft = run.full_draft()
    optimizer = full_optimizer_state(run.model, run.draft, run.optimizer, run.d)
    path = None
    if draft is not None and optimizer is not None:  # rank 0
        path = save_checkpoint(run.out, run.state, model=draft, optimizer=optimizer, rng_states=rngs,
                               config=config_to_dict(run.cfg), keep_last=run.cfg.train.keep_last)
        run.logger.write(f"saved checkpoint {path}")
    barrier(run.d)
    run.last_saved = run.state.step
    return path


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, saves and exits. A second signal aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
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
