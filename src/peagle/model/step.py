"""One P-EAGLE training step: COD → flat assembly → draft forward → KL loss, and its partitioned form.

The batch's B rows are flattened into one list of N = B·n positions (rows are just documents), COD
is sampled over it (`layout`), and the batch runs as the draft forward(s) of its *units*
(`units`): one unit for the flat step, or the S segment units of sequence partitioning
(docs/conventions.md, "Sequence partitioning") whose summed losses and gradients equal the flat
forward's, without redoing the depth-0 stream per segment:

* the first segment unit runs the depth-0 stream once (with grad, its graph kept for the last
  unit), handing every layer's depth-0 keys/values and the stream's last hidden state to the
  segments as detached leaf tensors;
* unit s < S runs only segment s's deeper elements, attending those leaves as context, and charges
  the loss of the segment's supervised elements (depth 0 read from the leaf hidden state); its
  backward accumulates gradients into the parameters and into the leaves;
* the last unit injects the leaves' accumulated gradients into the kept graph (a zero-valued
  surrogate loss), so the depth-0 stream is run forward once and back-propagated once (keeping its
  graph rather than recomputing it: docs/internals.md).

The caller runs ``for unit in trainer.units(batch): trainer(unit, normalizer).loss.backward()``. K and
the mask token are the draft's (``draft.config.num_speculative_tokens``, ``mask_token_id``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peagle.config.limits import check_limit
from peagle.data.shift import Batch
from peagle.model.cod import assign_segments, chains, document_starts, local_chains, sample_cod
from peagle.model.draft import PEagleDraft
from peagle.model.loss import LossSums, TargetHead, kl_loss
from peagle.model.mask import DenseCODAttention, FlexCODAttention
from peagle.model.tiled_attention import CODAttention

__all__ = ["Batch", "Layout", "PEagleTrainer", "StepMetrics", "StepOutput", "Unit"]


@dataclass
class StepMetrics:
    """Sums and counts only, so micro-batches and ranks aggregate exactly (by + or all-reduce)."""

    kl_per_depth: Tensor
    correct_per_depth: Tensor
    count_per_depth: Tensor

    @classmethod
    def zeros(cls, num_depths: int) -> StepMetrics:
        return cls(*(torch.zeros(num_depths, dtype=torch.float64) for _ in range(3)))

    @classmethod
    def from_sums(cls, sums: LossSums) -> StepMetrics:
        return cls(sums.kl_per_depth.detach().double().cpu(), sums.correct_per_depth.detach().double().cpu(),
                   sums.count_per_depth.detach().double().cpu())

    def __add__(self, other: StepMetrics) -> StepMetrics:
        return StepMetrics(self.kl_per_depth + other.kl_per_depth,
                           self.correct_per_depth + other.correct_per_depth,
                           self.count_per_depth + other.count_per_depth)

    def as_tensor(self) -> Tensor:
        """Packed [3, K] float64 (for one all-reduce)."""
        return torch.stack([self.kl_per_depth, self.correct_per_depth, self.count_per_depth])

    @classmethod
    def from_tensor(cls, t: Tensor) -> StepMetrics:
        return cls(t[0].clone(), t[1].clone(), t[2].clone())

    def summary(self) -> dict[str, float]:
        """loss (KL per supervised element), acc (all depths), and acc_d / n_d per depth."""
        total = float(self.count_per_depth.sum())
        out = {"loss": float(self.kl_per_depth.sum()) / max(total, 1.0),
               "acc": float(self.correct_per_depth.sum()) / max(total, 1.0), "supervised": total}
        for d in range(self.count_per_depth.numel()):
            n = float(self.count_per_depth[d])
            out[f"acc_{d}"] = float(self.correct_per_depth[d]) / n if n else float("nan")
            out[f"n_{d}"] = n
        return out


@dataclass
class StepOutput:
    loss: Tensor
    metrics: StepMetrics


@dataclass
class Layout:
    """A batch flattened and COD-sampled: everything its units need except the target states.

    Built from the shifted tokens alone (`PEagleTrainer.layout`), so the step counts its supervised
    elements before the target runs, and the forward uses the very same sample.
    """

    n: int                 # row length
    input_ids: Tensor      # [N]
    docs: Tensor           # [N] unique across rows, −1 padding
    positions: Tensor      # [N] rotary position of each position
    anchor: Tensor         # [M] flat position
    depth: Tensor          # [M]
    supervised: Tensor     # [M] bool
    key_start: Tensor      # [M] first visible depth-0 element (document start; > key_end if padding)
    chain: Tensor          # [M, K-1] elements (anchor, 1..depth) of the query's own chain, −1 = none

    @property
    def num_stream(self) -> int:
        return self.docs.numel()

    @property
    def supervised_count(self) -> int:
        """Supervised COD elements (the loss count; all-reduce it across ranks first)."""
        return int(self.supervised.sum())

    def supervised_per_depth(self, num_depths: int) -> Tensor:
        """Supervised COD elements of each depth, float64 [K] (for `loss_divisor`; all-reduce them first)."""
        return torch.bincount(self.depth[self.supervised], minlength=num_depths).double().cpu()


class Unit:
    """One forward + backward of a batch (a plain object: DDP must not scatter it).

    kind "flat": the whole batch; "segment": the depth ≥ 1 elements of one partition segment
    (``deep``) and the supervised elements it charges (``charged``); "context": the back-propagation of
    the depth-0 stream (run by the first segment), carrying the gradients the segments left on the
    shared leaves.
    """

    def __init__(self, kind: str, batch: Batch, layout: Layout, shared: _Shared | None = None,
                 deep: Tensor | None = None, charged: Tensor | None = None) -> None:
        self.kind, self.batch, self.layout, self.shared = kind, batch, layout, shared
        self.deep, self.charged = deep, charged


class _Shared:
    """The depth-0 stream of a partitioned batch, run once with grad by the first segment unit (so under
    the caller's autocast): its outputs detached as the leaves every segment attends, its graph kept
    for the context unit's backward."""

    def __init__(self, supervised_count: int):
        self.supervised_count = supervised_count
        self.context: list[tuple[Tensor, Tensor]] | None = None  # per-layer depth-0 (k, v) leaves
        self.stream_hidden: Tensor | None = None                  # depth-0 last hidden state leaf [N, H]
        self.stream: tuple[Tensor, dict] | None = None            # the same with their graph


class PEagleTrainer(nn.Module):
    """Draft-side P-EAGLE training module: `units(batch)`, then `forward(unit) -> StepOutput(loss, metrics)`.

    attention: "structured" (any device, the default on CPU), "flex" (compiled FlexAttention,
    the default on CUDA) or "dense" (an [M, M] boolean mask with SDPA: the reference baseline).
    """

    def __init__(
        self, draft: PEagleDraft, ratio: float = 0.7, ratio_min: float = 0.2, max_anchors: int | None = None,
        sequence_partitions: int = 1, target_head: TargetHead | None = None, attention: str = "auto",
        loss_chunk_size: int = 2048,
    ):
        super().__init__()
        for name, value in (("sequence_partitions", sequence_partitions), ("ratio", ratio),
                            ("ratio_min", ratio_min), ("max_anchors", max_anchors)):
            check_limit(name, value)
        if attention not in ("auto", "structured", "flex", "dense"):
            raise ValueError(f"attention must be auto|structured|flex|dense, got {attention!r}")
        self.draft = draft
        self.target_head = target_head
        self.ratio, self.ratio_min = float(ratio), float(ratio_min)
        self.max_anchors, self.sequence_partitions = max_anchors, sequence_partitions
        self.attention, self.loss_chunk_size = attention, loss_chunk_size

    @property
    def num_depths(self) -> int:
        """K: the draft's number of parallel depths (one source of truth: its config)."""
        return self.draft.config.num_speculative_tokens

    # ------------------------------------------------------------------------------------ layout
    def _check_tokens(self, batch: Batch) -> None:
        if batch.input_ids.dim() != 2:
            raise ValueError(f"Batch.input_ids must be [B, n], got shape {tuple(batch.input_ids.shape)}")
        b, n = batch.input_ids.shape
        if batch.input_ids.dtype != torch.long or batch.document_ids.dtype != torch.long:
            raise ValueError("Batch.input_ids and Batch.document_ids must be int64 tensors")
        for name in ("loss_mask", "document_ids", "cod_seeds", "position_ids"):
            t = getattr(batch, name)
            if t is not None and tuple(t.shape) != (b, n):
                raise ValueError(f"Batch.{name} must have shape {(b, n)}, got {tuple(t.shape)}")

    def _check_states(self, batch: Batch) -> None:
        cfg = self.draft.config
        b, n = batch.input_ids.shape
        ht = cfg.target_hidden_size or cfg.hidden_size
        want = (b, n, cfg.num_aux_layers * ht)
        if batch.aux_hidden is None or tuple(batch.aux_hidden.shape) != want:
            got = None if batch.aux_hidden is None else tuple(batch.aux_hidden.shape)
            raise ValueError(f"Batch.aux_hidden must have shape {want}, got {got}")
        if (batch.target_logits is None) == (batch.target_hidden is None):
            raise ValueError("Batch needs exactly one of target_logits and target_hidden")
        if batch.target_logits is not None:
            vd = cfg.draft_vocab_size or cfg.vocab_size
            if tuple(batch.target_logits.shape) != (b, n, vd):
                raise ValueError(f"Batch.target_logits must have shape {(b, n, vd)} (draft vocab), "
                                 f"got {tuple(batch.target_logits.shape)}")
        else:
            if self.target_head is None:
                raise ValueError("Batch.target_hidden needs a trainer built with target_head=TargetHead(...)")
            if tuple(batch.target_hidden.shape[:2]) != (b, n):
                raise ValueError(f"Batch.target_hidden must be [B, n, H] with B, n = {(b, n)}, "
                                 f"got {tuple(batch.target_hidden.shape)}")

    @torch.no_grad()
    def layout(self, batch: Batch) -> Layout:
        """Flatten the rows and sample COD (from the shifted tokens: target states are not needed)."""
        self._check_tokens(batch)
        b, n = batch.input_ids.shape
        device = batch.input_ids.device
        docs = batch.document_ids
        stride = int(docs.max().clamp(min=0)) + 1
        rows = torch.arange(b, device=device)[:, None]
        flat_docs = torch.where(docs >= 0, docs + rows * stride, -1).reshape(-1)
        loss_mask = batch.loss_mask.reshape(-1).bool() & (flat_docs >= 0)
        if batch.cod_seeds is not None:
            seeds = batch.cod_seeds.reshape(-1)
        else:  # one draw from torch's RNG per batch (reproducible, restored on resume), per document
            seeds = int(torch.randint(0, 2**31 - 1, ())) + flat_docs * 1_000_003
        anchor, depth = sample_cod(loss_mask, flat_docs, self.num_depths, self.ratio, self.ratio_min,
                                   self.max_anchors, seed=seeds)
        starts = document_starts(flat_docs)
        if batch.position_ids is not None:
            positions = batch.position_ids.reshape(-1)
        else:
            positions = torch.arange(b * n, device=device) - starts
        real = flat_docs[anchor] >= 0
        return Layout(
            n=n, input_ids=batch.input_ids.reshape(-1), docs=flat_docs, positions=positions, anchor=anchor,
            depth=depth, supervised=loss_mask[anchor + depth] & real,
            key_start=torch.where(real, starts[anchor], anchor + 1),
            chain=chains(anchor, depth, self.num_depths),
        )

    def count_supervised(self, batch: Batch) -> int:
        """Supervised COD elements of this batch (the loss count; all-reduce it across ranks first)."""
        if batch.cod_seeds is None:
            raise ValueError("count_supervised needs Batch.cod_seeds so the forward samples the same COD")
        return self.layout(batch).supervised_count

    # ------------------------------------------------------------------------------------ units
    def units(self, batch: Batch, layout: Layout | None = None) -> Iterator[Unit]:
        """The forwards of one batch (with its target states): one flat unit, or S + 1 partition units.

        ``layout``: this batch's `layout(...)` when already built (to count before the target ran).
        """
        self._check_tokens(batch)
        self._check_states(batch)
        lay = layout if layout is not None else self.layout(batch)
        if self.sequence_partitions == 1:
            yield Unit("flat", batch, lay)
            return
        seg = assign_segments(lay.anchor % lay.n, lay.depth, lay.n, self.sequence_partitions)
        deep_all = lay.depth > 0
        segments = []
        for s in range(self.sequence_partitions):
            in_seg = seg == s
            charged = torch.nonzero(in_seg & lay.supervised).squeeze(1)
            if charged.numel():
                segments.append((torch.nonzero(in_seg & deep_all).squeeze(1), charged))
        shared = _Shared(lay.supervised_count)
        for deep, charged in segments:
            yield Unit("segment", batch, lay, shared, deep, charged)
        yield Unit("context", batch, lay, shared)

    # ----------------------------------------------------------------------------------- forward
    def forward(self, unit: Unit | Batch, normalizer: float | Tensor | tuple[float, ...] | None = None
                ) -> StepOutput:
        """KL sum / normalizer (default: the batch's supervised count) and exact sums/counts.

        ``normalizer`` is a number (every element weighs 1/normalizer) or K numbers (an element of depth d
        weighs 1/normalizer[d]): `peagle.model.loss.loss_divisor` makes either from the step's counts.
        A `Batch` is run as its single flat unit (sequence partitions need `units`).
        """
        if isinstance(unit, Batch):
            if self.sequence_partitions != 1:
                raise ValueError("a partitioned trainer runs a batch unit by unit: iterate trainer.units(batch)")
            unit = next(self.units(unit))
        if unit.kind == "segment":
            return self._segment_forward(unit, normalizer)
        if unit.kind == "context":
            return StepOutput(self._inject_context(unit), StepMetrics.zeros(self.num_depths))
        lay = unit.layout
        deep = torch.arange(lay.num_stream, lay.anchor.numel(), device=lay.anchor.device)
        ids, hidden, positions, slots = self._assemble(unit.batch, lay, deep, stream=True)
        h = self.draft(ids, hidden, positions, self._attention(lay), slots)
        sup = torch.nonzero(lay.supervised).squeeze(1)
        weight, divisor = _scale(normalizer, sup.numel())
        sums = self._loss(unit.batch, lay, h.index_select(0, sup), sup, weight)
        return StepOutput(sums.kl_sum / divisor, StepMetrics.from_sums(sums))

    def _attention(self, lay: Layout) -> object:
        mode = self.attention
        if mode == "auto":
            mode = "flex" if lay.anchor.is_cuda else "structured"
        if mode == "flex":
            return FlexCODAttention(lay.anchor, lay.depth, lay.docs)
        if mode == "dense":
            return DenseCODAttention(lay.anchor, lay.depth, lay.docs)
        return CODAttention(lay.key_start, lay.anchor, lay.chain, num_context=lay.num_stream,
                            stream_shape=(lay.num_stream // lay.n, lay.n))

    def _assemble(self, batch: Batch, lay: Layout, deep: Tensor | None, stream: bool
                  ) -> tuple[Tensor, Tensor, Tensor, int]:
        """The draft's input: token ids and projected hidden of the depth-0 stream (none without it),
        the positions of every row, and how many mask slots (`deep`) follow (the draft builds them)."""
        draft = self.draft
        if stream:
            ids, positions = lay.input_ids, [lay.positions]
            hidden = draft.project_aux(batch.aux_hidden.reshape(lay.num_stream, -1).to(draft.fc.weight.dtype))
        else:
            ids, positions = lay.input_ids[:0], []
            hidden = torch.empty(0, draft.config.hidden_size, dtype=draft.fc.weight.dtype, device=ids.device)
        slots = 0 if deep is None else deep.numel()
        if slots:
            positions.append(lay.positions[lay.anchor[deep]] + lay.depth[deep])
        return ids, hidden, torch.cat(positions), slots

    def _loss(self, batch: Batch, lay: Layout, hidden: Tensor, elements: Tensor,
              depth_weight: Tensor | None = None) -> LossSums:
        """KL sums of `elements` (supervised) whose pre-norm draft hidden states are `hidden`."""
        if elements.numel() == 0:  # nothing supervised: differentiable zeros
            z = torch.zeros(self.num_depths, dtype=torch.float64)
            return LossSums(hidden.sum() * 0.0, z, z.clone(), z.clone())
        ref = lay.anchor[elements] + lay.depth[elements]
        if batch.target_hidden is not None:
            kwargs = {"target_hidden": batch.target_hidden.reshape(lay.num_stream, -1),
                      "target_head": self.target_head}
        else:
            kwargs = {"target_logits": batch.target_logits.reshape(lay.num_stream, -1)}
        return kl_loss(self.draft.final_hidden(hidden), self.draft.lm_head.weight, lay.depth[elements],
                       self.num_depths, target_index=ref, chunk_size=self.loss_chunk_size,
                       depth_weight=depth_weight, **kwargs)

    # ---------------------------------------------------------------------- sequence partitions
    def _stream(self, batch: Batch, lay: Layout) -> tuple[Tensor, dict]:
        """The depth-0 stream alone: its last hidden state and every layer's (k, v)."""
        n = lay.num_stream
        record: dict = {}
        ids, hidden, positions, _ = self._assemble(batch, lay, None, stream=True)
        attn = CODAttention(lay.key_start[:n], lay.anchor[:n], lay.chain[:n, :0], num_context=n, record=record,
                            stream_shape=(n // lay.n, lay.n))
        return self.draft(ids, hidden, positions, attn), record

    def _segment_forward(self, unit: Unit, normalizer: float | Tensor | tuple[float, ...] | None) -> StepOutput:
        lay, shared, deep, charged = unit.layout, unit.shared, unit.deep, unit.charged
        if shared.context is None:
            shared.stream = h, record = self._stream(unit.batch, lay)
            shared.context = [(record[i][0].detach().requires_grad_(), record[i][1].detach().requires_grad_())
                              for i in range(len(record))]
            shared.stream_hidden = h.detach().requires_grad_()
        from_stream = charged < lay.num_stream
        rows = [shared.stream_hidden.index_select(0, charged[from_stream])]
        if deep.numel():  # deep elements are all supervised: they are charged[~from_stream], in order
            ids, hidden, positions, slots = self._assemble(unit.batch, lay, deep, stream=False)
            attn = CODAttention(lay.key_start[deep], lay.anchor[deep],
                                local_chains(lay.chain[deep], deep, lay.anchor.numel()), context=shared.context)
            rows.append(self.draft(ids, hidden, positions, attn, slots))
        weight, divisor = _scale(normalizer, shared.supervised_count)
        sums = self._loss(unit.batch, lay, torch.cat(rows), torch.cat([charged[from_stream], deep]), weight)
        return StepOutput(sums.kl_sum / divisor, StepMetrics.from_sums(sums))

    def _inject_context(self, unit: Unit) -> Tensor:
        """A zero-valued loss carrying the leaves' gradients into the depth-0 stream's graph."""
        shared = unit.shared
        if shared.stream is None:  # no segment ran (nothing supervised)
            return self._stream(unit.batch, unit.layout)[0].sum() * 0.0
        (h, record), shared.stream = shared.stream, None
        terms = [(h * shared.stream_hidden.grad).sum()] if shared.stream_hidden.grad is not None else []
        for layer, (k_leaf, v_leaf) in enumerate(shared.context):
            k, v = record[layer]
            if k_leaf.grad is not None:
                terms.append((k * k_leaf.grad).sum())
            if v_leaf.grad is not None:
                terms.append((v * v_leaf.grad).sum())
        if not terms:
            return h.sum() * 0.0
        surrogate = torch.stack(terms).sum()
        return surrogate - surrogate.detach()


def _scale(normalizer: float | Tensor | tuple[float, ...] | None, count: int
           ) -> tuple[Tensor | None, float | Tensor]:
    """(per-depth weights for `kl_loss`, divisor of its sum) for `PEagleTrainer.forward`'s normalizer."""
    if normalizer is None:
        return None, float(max(count, 1))
    if isinstance(normalizer, (tuple, list)):
        return 1.0 / torch.tensor(normalizer, dtype=torch.float64), 1.0
    return None, normalizer
