"""The training data loader: train/validation split, per-epoch packing, a step's micro-batches.

Deterministic in (seed, epoch): an epoch's packed rows are recomputed, never stored, so a resumed run
reads exactly the rows a run that never stopped would have read. One optimizer step takes the next
``G = world × grad_accum × micro_batch_size`` rows of the epoch; micro-batch j of rank r holds rows
``[(j·W + r)·mb, (j·W + r + 1)·mb)`` of the step, so the step's union does not depend on how it is
split over ranks and micro-batches. COD seeds come from (run seed, epoch, example index), so the COD
sample of a document does not depend on the split either (docs/conventions.md, "Partitioning").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from peagle.config.training import Config, ConfigError
from peagle.data.packing import PackedRows, cod_seeds, collate, pack
from peagle.data.prepared import PreparedData
from peagle.data.shift import Batch, eagle_shift, shift_states
from peagle.store.checkpoint import TrainState

__all__ = ["MicroBatch", "TrainData"]


@dataclass
class MicroBatch:
    """One micro-batch: the packed rows (what the target reads) and their shift (tokens + COD seeds).

    ``batch`` has no target states yet: the step counts its supervised COD elements first, then the
    target (or the cache) supplies the states of ``packed`` and `with_states` adds them.
    """

    packed: PackedRows
    batch: Batch
    tokens: int

    def with_states(self, source: Any, device: torch.device, states: tuple[Any, Any] | None = None) -> Batch:
        """``batch`` with the target states of ``packed`` from ``source`` (the Target, the state cache or the
        stream: anything with ``states(packed) -> (aux, final)``), or the ``states`` given (taken from the
        stream beforehand), shifted the same way, on ``device``."""
        return shift_states(self.batch, *(states if states is not None else source.states(self.packed))).to(device)


class TrainData:
    """Train/val split by source chat, per-epoch packed rows, and micro-batch assembly."""

    def __init__(self, cfg: Config, prepared: PreparedData, rows_per_step: int) -> None:
        self.cfg, self.prepared, self.rows_per_step = cfg, prepared, rows_per_step
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
        n_val = max(1, round(n * cfg.data.val_fraction)) if cfg.data.val_fraction > 0 else 0
        val: list[int] = []
        for j in perm:
            if len(val) >= n_val:
                break
            val += groups[j]
        if n_val and len(val) >= n:
            raise ConfigError(f"data.val_fraction {cfg.data.val_fraction} leaves no training example ({n})")
        self.val_ids = sorted(val)
        self.train_ids = sorted(set(range(n)) - set(val))
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
            if self.val_ids else []
        )

    # -------------------------------------------------------------------------------- epochs
    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Packed rows (global example indices) of ``epoch``: a deterministic function of (seed, epoch)."""
        rows = self._epoch_cache.get(epoch)
        if rows is None:
            seed = None
            if self.cfg.data.shuffle:
                seed = (self.cfg.train.seed * 1_000_003 + epoch * 7_919 + 1) % (2**62)
            local = pack([self.lengths[i] for i in self.train_ids], self.cfg.data.max_length, seed=seed)
            rows = [[self.train_ids[i] for i in row] for row in local]
            self._epoch_cache = {e: r for e, r in self._epoch_cache.items() if e >= epoch - 1}
            self._epoch_cache[epoch] = rows
        return rows

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.epoch_rows(epoch)) // self.rows_per_step

    def positions(self, state: TrainState, total: int) -> Iterator[tuple[int, int]]:
        """(epoch, first row) of every remaining step from ``state`` up to ``total`` steps."""
        epoch, row = state.epoch, state.row_in_epoch
        for _ in range(state.step, total):
            if row + self.rows_per_step > len(self.epoch_rows(epoch)):
                epoch, row = epoch + 1, 0
            yield epoch, row
            row += self.rows_per_step

    def advance(self, epoch: int, row: int) -> tuple[int, int]:
        """The data position after the step at (epoch, row) (what a checkpoint records)."""
        row += self.rows_per_step
        if row + self.rows_per_step > len(self.epoch_rows(epoch)):
            return epoch + 1, 0
        return epoch, row

    def stream_schedule(self, state: TrainState, total: int, rank: int, world: int) -> Iterator[list[int]]:
        """The example indices (row by row) of every micro-batch this rank will train from ``state`` up to
        ``total`` steps, in the order the loop takes them: what the streamed target states are asked for.
        ``state`` is read now (a later change of it does not move the schedule)."""
        start = TrainState(step=state.step, epoch=state.epoch, row_in_epoch=state.row_in_epoch)

        def schedule() -> Iterator[list[int]]:
            for epoch, row in self.positions(start, total):
                for rows in self.step_micro_rows(epoch, row, rank, world):
                    yield [i for r in rows for i in r]

        return schedule()

    # -------------------------------------------------------------------------------- batches
    def step_micro_rows(self, epoch: int, row: int, rank: int, world: int) -> list[list[list[int]]]:
        """This rank's micro-batches (lists of packed rows) of the step starting at (epoch, row)."""
        step_rows = self.epoch_rows(epoch)[row : row + self.rows_per_step]
        mb = self.cfg.train.micro_batch_size
        return [step_rows[(j * world + rank) * mb : (j * world + rank + 1) * mb]
                for j in range(self.cfg.train.grad_accum)]

    def micro_batch(self, rows: list[list[int]], epoch: int) -> MicroBatch:
        """Collate ``rows``, shift them and attach each position's COD seed (from seed, epoch, example)."""
        packed = collate(self.prepared, rows, self.cfg.data.max_length)
        batch = eagle_shift(packed.input_ids, packed.loss_mask, packed.document_ids,
                            example_index=packed.example_index)
        batch.cod_seeds = cod_seeds(batch.example_index, self.cfg.train.seed, epoch)
        return MicroBatch(packed, batch, int((packed.document_ids >= 0).sum()))

    def val_micro_batches(self, rank: int, world: int, epoch: int) -> Iterator[MicroBatch]:
        """This rank's share of the validation rows, ``micro_batch_size`` rows at a time."""
        mine = self.val_rows[rank::world]
        mb = self.cfg.train.micro_batch_size
        for i in range(0, len(mine), mb):
            yield self.micro_batch(mine[i : i + mb], epoch)

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
