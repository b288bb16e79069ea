"""One P-EAGLE training step: COD → flat assembly → draft forward → KL loss, and its partitioned form.

The batch's B rows are flattened into one list of N = B·n positions (rows are just documents), COD
is sampled over it, and the whole batch runs as ONE draft forward. `plan()` + `forward(segment=…)`
splits that forward into Algorithm-1 segments (docs/conventions.md, "Sequence partitioning") whose
summed losses and gradients equal the flat forward's, without redoing the depth-0 stream per segment:

* `plan()` (no grad) samples COD once and runs the depth-0 stream once, keeping every layer's
  depth-0 keys/values and the stream's last hidden state as detached leaf tensors;
* unit s < S runs only segment s's deeper elements, attending those leaves as context, and charges
  the loss of the segment's supervised elements (depth 0 read from the leaf hidden state); its
  backward accumulates gradients into the parameters and into the leaves;
* the last unit recomputes the depth-0 stream with grad and injects the leaves' accumulated
  gradients (a zero-valued surrogate loss), so the depth-0 stream is back-propagated once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .cod import assign_segments, chain_table, document_starts, sample_cod
from .draft import PEagleDraft
from .loss import LossSums, TargetHead, kl_loss
from .mask import CODAttention, DenseCODAttention, FlexCODAttention


@dataclass
class Batch:
    """B packed rows, already EAGLE-shifted (docs/conventions.md): element i = (token x_{i+1}, aux g_i).

    document_ids: −1 = padding, several documents per row allowed. Exactly one of target_logits
    (over the draft vocab) and target_hidden (the target's last hidden state, used with the
    trainer's frozen TargetHead). cod_seeds: each position's document COD seed (sampling then
    depends only on the document); position_ids: default = position within the document.
    """

    input_ids: Tensor
    aux_hidden: Tensor
    loss_mask: Tensor
    document_ids: Tensor
    target_logits: Tensor | None = None
    target_hidden: Tensor | None = None
    cod_seeds: Tensor | None = None
    position_ids: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                        for f in fields(self)})


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
class _Layout:
    """A batch flattened and COD-sampled: everything a forward needs, no model state."""

    n: int                 # row length
    input_ids: Tensor      # [N]
    aux: Tensor            # [N, 3Ht]
    docs: Tensor           # [N] unique across rows, −1 padding
    positions: Tensor      # [N] rotary position of each position
    anchor: Tensor         # [M] flat position
    depth: Tensor          # [M]
    supervised: Tensor     # [M] bool
    key_start: Tensor      # [M] first visible depth-0 element (document start; > key_end if padding)
    chain: Tensor          # [M, K-1] elements (anchor, 1..depth) of the query's own chain, −1 = none
    targets: Tensor        # [N, Vd] logits or [N, Ht] hidden, flattened
    target_is_hidden: bool


class Plan:
    """COD sample + segment units of one batch (a plain object: DDP must not scatter it)."""

    def __init__(self, layout: _Layout, units: list, supervised_count: int):
        self.layout = layout
        self.units = units
        self.supervised_count = supervised_count
        self.context: list[tuple[Tensor, Tensor]] = []   # per-layer depth-0 (k, v) leaves
        self.stream_hidden: Tensor | None = None          # depth-0 last hidden state leaf [N, H]


@dataclass
class _SegmentUnit:
    deep: Tensor      # element indices of the segment's depth ≥ 1 elements
    charged: Tensor   # element indices of the segment's supervised elements (depth 0 and deeper)


class _ContextUnit:
    """The last unit: back-propagate the depth-0 stream once with the leaves' gradients."""


class PEagleTrainer(nn.Module):
    """Draft-side P-EAGLE training module: `forward(batch) -> StepOutput(loss, metrics)`.

    attention: "structured" (any device, the default on CPU), "flex" (compiled FlexAttention,
    the default on CUDA) or "dense" (an [M, M] boolean mask with SDPA: the reference baseline).
    """

    def __init__(
        self, draft: PEagleDraft, num_depths: int = 8, ratio: float = 0.7, ratio_min: float = 0.2,
        max_anchors: int | None = None, sequence_partitions: int = 1, target_head: TargetHead | None = None,
        attention: str = "auto", loss_chunk_size: int = 2048,
    ):
        super().__init__()
        if not isinstance(num_depths, int) or isinstance(num_depths, bool) or num_depths < 1:
            raise ValueError(f"num_depths must be an int >= 1, got {num_depths!r}")
        if not isinstance(sequence_partitions, int) or isinstance(sequence_partitions, bool) \
                or sequence_partitions < 1:
            raise ValueError(f"sequence_partitions must be an int >= 1, got {sequence_partitions!r}")
        for name, r in (("ratio", ratio), ("ratio_min", ratio_min)):
            if not 0.0 < float(r) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {r!r}")
        if max_anchors is not None and (not isinstance(max_anchors, int) or max_anchors < 1):
            raise ValueError(f"max_anchors must be None or an int >= 1, got {max_anchors!r}")
        if attention not in ("auto", "structured", "flex", "dense"):
            raise ValueError(f"attention must be auto|structured|flex|dense, got {attention!r}")
        cfg = draft.config
        if not 0 <= cfg.mask_token_id < cfg.vocab_size:
            raise ValueError(f"mask_token_id {cfg.mask_token_id} is outside the target vocab [0, {cfg.vocab_size})")
        self.draft = draft
        self.target_head = target_head
        self.num_depths, self.ratio, self.ratio_min = num_depths, float(ratio), float(ratio_min)
        self.max_anchors, self.sequence_partitions = max_anchors, sequence_partitions
        self.attention, self.loss_chunk_size = attention, loss_chunk_size

    # ------------------------------------------------------------------------------------ layout
    def _check(self, batch: Batch) -> None:
        cfg = self.draft.config
        if batch.input_ids.dim() != 2:
            raise ValueError(f"Batch.input_ids must be [B, n], got shape {tuple(batch.input_ids.shape)}")
        b, n = batch.input_ids.shape
        if batch.input_ids.dtype != torch.long or batch.document_ids.dtype != torch.long:
            raise ValueError("Batch.input_ids and Batch.document_ids must be int64 tensors")
        for name in ("loss_mask", "document_ids", "cod_seeds", "position_ids"):
            t = getattr(batch, name)
            if t is not None and tuple(t.shape) != (b, n):
                raise ValueError(f"Batch.{name} must have shape {(b, n)}, got {tuple(t.shape)}")
        ht = cfg.target_hidden_size or cfg.hidden_size
        want = (b, n, cfg.num_aux_layers * ht)
        if tuple(batch.aux_hidden.shape) != want:
            raise ValueError(f"Batch.aux_hidden must have shape {want}, got {tuple(batch.aux_hidden.shape)}")
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
    def _layout(self, batch: Batch) -> _Layout:
        self._check(batch)
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
        ref = anchor + depth
        real = flat_docs[anchor] >= 0
        key_start = torch.where(real, starts[anchor], anchor + 1)
        table = chain_table(anchor, depth, self.num_depths)[:, 1:]
        cols = torch.arange(1, self.num_depths, device=device)
        chain = torch.where(cols[None, :] <= depth[:, None], table, -1)
        hidden_target = batch.target_hidden is not None
        targets = (batch.target_hidden if hidden_target else batch.target_logits).reshape(b * n, -1)
        return _Layout(
            n=n, input_ids=batch.input_ids.reshape(-1), aux=batch.aux_hidden.reshape(b * n, -1),
            docs=flat_docs, positions=positions, anchor=anchor, depth=depth,
            supervised=loss_mask[ref] & real, key_start=key_start, chain=chain,
            targets=targets, target_is_hidden=hidden_target,
        )

    def count_supervised(self, batch: Batch) -> int:
        """Supervised COD elements of this batch (the loss count; all-reduce it across ranks first)."""
        if batch.cod_seeds is None:
            raise ValueError("count_supervised needs Batch.cod_seeds so the forward samples the same COD")
        return int(self._layout(batch).supervised.sum())

    # ----------------------------------------------------------------------------------- forward
    def _attention(self, lay: _Layout) -> object:
        mode = self.attention
        if mode == "auto":
            mode = "flex" if lay.anchor.is_cuda else "structured"
        if mode == "flex":
            return FlexCODAttention(lay.anchor, lay.depth, lay.docs)
        if mode == "dense":
            return DenseCODAttention(lay.anchor, lay.depth, lay.docs)
        return CODAttention(lay.key_start, lay.anchor, lay.chain, num_context=lay.docs.numel(),
                            stream_shape=(lay.docs.numel() // lay.n, lay.n))

    def _assemble(self, lay: _Layout, elements: Tensor | None, stream: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Token ids, projected hidden and positions: the depth-0 stream and/or deep elements."""
        draft = self.draft
        parts_ids, parts_hidden = [], []
        if stream:
            parts_ids.append(lay.input_ids)
            parts_hidden.append(draft.project_aux(lay.aux.to(draft.fc.weight.dtype)))
        if elements is not None and elements.numel():
            parts_ids.append(torch.full_like(elements, draft.config.mask_token_id))
            mask_row = draft.projected_mask_hidden()
            parts_hidden.append(mask_row.reshape(1, -1).expand(elements.numel(), -1))
        ids = torch.cat(parts_ids)
        hidden = torch.cat(parts_hidden)
        chosen = elements if elements is not None else lay.anchor[:0]
        pos_deep = lay.positions[lay.anchor[chosen]] + lay.depth[chosen]
        positions = torch.cat([lay.positions, pos_deep]) if stream else pos_deep
        return ids, hidden, positions

    def _loss(self, lay: _Layout, hidden: Tensor, elements: Tensor) -> LossSums:
        """KL sums of `elements` (supervised) whose pre-norm draft hidden states are `hidden`."""
        if elements.numel() == 0:  # nothing supervised: differentiable zeros
            z = torch.zeros(self.num_depths, dtype=torch.float64)
            return LossSums(hidden.sum() * 0.0, z, z.clone(), z.clone())
        ref = lay.anchor[elements] + lay.depth[elements]
        kwargs = {"target_hidden": lay.targets, "target_head": self.target_head} if lay.target_is_hidden \
            else {"target_logits": lay.targets}
        return kl_loss(self.draft.final_hidden(hidden), self.draft.lm_head.weight, lay.depth[elements],
                       self.num_depths, target_index=ref, chunk_size=self.loss_chunk_size, **kwargs)

    def forward(self, batch: Batch, normalizer: float | Tensor | None = None,
                segment: tuple[Plan, int] | None = None) -> StepOutput:
        """KL sum / normalizer (default: this batch's supervised count) and exact sums/counts."""
        if segment is not None:
            plan, i = segment
            return self._segment_forward(plan, i, normalizer)
        lay = self._layout(batch)
        n_stream = lay.docs.numel()
        ids, hidden, positions = self._assemble(lay, torch.arange(n_stream, lay.anchor.numel(),
                                                                  device=lay.anchor.device), stream=True)
        h = self.draft(ids, hidden, positions, self._attention(lay))
        sup = torch.nonzero(lay.supervised).squeeze(1)
        sums = self._loss(lay, h.index_select(0, sup), sup)
        norm = _normalizer(normalizer, sup.numel())
        return StepOutput(sums.kl_sum / norm, StepMetrics.from_sums(sums))

    # ---------------------------------------------------------------------- sequence partitions
    @torch.no_grad()
    def plan(self, batch: Batch) -> Plan:
        """Sample COD once, run the depth-0 stream once, and split the rest into S segment units."""
        lay = self._layout(batch)
        local_anchor = lay.anchor % lay.n
        seg = assign_segments(local_anchor, lay.depth, lay.n, self.sequence_partitions)
        units: list = []
        deep_all = lay.depth > 0
        for s in range(self.sequence_partitions):
            in_seg = seg == s
            charged = torch.nonzero(in_seg & lay.supervised).squeeze(1)
            deep = torch.nonzero(in_seg & deep_all).squeeze(1)
            if charged.numel():
                units.append(_SegmentUnit(deep=deep, charged=charged))
        units.append(_ContextUnit())
        plan = Plan(lay, units, int(lay.supervised.sum()))
        h, record = self._stream(lay)
        plan.context = [(record[i][0].detach().requires_grad_(), record[i][1].detach().requires_grad_())
                        for i in range(len(record))]
        plan.stream_hidden = h.detach().requires_grad_()
        return plan

    def _stream(self, lay: _Layout) -> tuple[Tensor, dict]:
        """The depth-0 stream alone: its last hidden state and every layer's (k, v)."""
        n_stream = lay.docs.numel()
        record: dict = {}
        ids, hidden, positions = self._assemble(lay, None, stream=True)
        attn = CODAttention(lay.key_start[:n_stream], lay.anchor[:n_stream], lay.chain[:n_stream, :0],
                            num_context=n_stream, record=record, stream_shape=(n_stream // lay.n, lay.n))
        return self.draft(ids, hidden, positions, attn), record

    def _segment_forward(self, plan: Plan, i: int, normalizer) -> StepOutput:
        lay, unit = plan.layout, plan.units[i]
        if isinstance(unit, _ContextUnit):
            return StepOutput(self._inject_context(plan), StepMetrics.zeros(self.num_depths))
        deep, charged = unit.deep, unit.charged
        from_stream = charged < lay.docs.numel()
        rows = [plan.stream_hidden.index_select(0, charged[from_stream])]
        if deep.numel():  # deep elements are all supervised: they are charged[~from_stream], in order
            local = torch.full((lay.anchor.numel(),), -1, dtype=torch.long, device=deep.device)
            local[deep] = torch.arange(deep.numel(), device=deep.device)
            chain = lay.chain[deep]
            chain = torch.where(chain >= 0, local[chain.clamp(min=0)], -1)
            ids, hidden, positions = self._assemble(lay, deep, stream=False)
            attn = CODAttention(lay.key_start[deep], lay.anchor[deep], chain, context=plan.context)
            rows.append(self.draft(ids, hidden, positions, attn))
        sums = self._loss(lay, torch.cat(rows), torch.cat([charged[from_stream], deep]))
        return StepOutput(sums.kl_sum / _normalizer(normalizer, plan.supervised_count), StepMetrics.from_sums(sums))

    def _inject_context(self, plan: Plan) -> Tensor:
        """Recompute the depth-0 stream with grad; a zero-valued loss carrying the leaves' gradients."""
        h, record = self._stream(plan.layout)
        terms = [(h * plan.stream_hidden.grad).sum()] if plan.stream_hidden.grad is not None else []
        for layer, (k_leaf, v_leaf) in enumerate(plan.context):
            k, v = record[layer]
            if k_leaf.grad is not None:
                terms.append((k * k_leaf.grad).sum())
            if v_leaf.grad is not None:
                terms.append((v * v_leaf.grad).sum())
        if not terms:
            return h.sum() * 0.0
        surrogate = torch.stack(terms).sum()
        return surrogate - surrogate.detach()


def _normalizer(normalizer: float | Tensor | None, count: int) -> float | Tensor:
    if normalizer is None:
        return float(max(count, 1))
    return normalizer
