"""The one-pass draft forward: every anchor × every depth of a prepared set, teacher-forced.

Why one forward is enough (docs/evaluation.md): in vLLM's parallel-drafting runtime every draft slot
reads only verified tokens, the target's aux states and the fixed mask slots (`PEagleDraft.mask_slots`),
never the draft's own guesses. So over the target's greedy continuation, one teacher-forced forward
with every position as an anchor and all K depths gives, for every anchor, exactly the K tokens vLLM
proposes there: `draft_token_tables`, [n, K] target ids per prompt (row = anchor, column = depth).
The depth-0 stream runs once; the mask slots run in chunks of whole chains (`peagle.model.cod.chains` /
`local_chains`) against its recorded keys and values — exactly the COD mask, so the chunking does not
change a result. `acceptance_on` scores a draft on a prepared set this way (the training loop's hook).

The EAGLE shift here: element i of a prompt = (token x_{i+1}, aux g_i) at position i, i < T − 1
(`shift_sequence`): `peagle.data.eagle_shift` of that one document without its trailing padding slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from peagle.eval.continuations import ContinuationSet
from peagle.eval.errors import EvalError
from peagle.eval.rounds import metrics_by_k, rounds_by_k, summarise
from peagle.model.cod import chains, document_starts, local_chains
from peagle.model.draft import PEagleDraft
from peagle.model.tiled_attention import CODAttention

__all__ = ["acceptance_on", "draft_token_tables", "shift_sequence"]


def shift_sequence(tokens: Sequence[int], aux: Tensor) -> tuple[Tensor, Tensor]:
    """The EAGLE-shifted elements of one unpadded sequence of T tokens: (ids [T−1] = x_1..x_{T−1},
    aux [T−1, ·] = g_0..g_{T−2}); element i sits at position i.

    Equal to `peagle.data.eagle_shift` of the sequence as one document minus its last element (the
    padding slot a packed row needs to keep documents contiguous; evaluation packs none).
    """
    n = len(tokens) - 1
    return torch.tensor(list(tokens[1:]), dtype=torch.long), aux[:n]


def argmax_target_ids(draft: PEagleDraft, h: Tensor, max_logits: int = 1 << 24) -> Tensor:
    """Greedy draft tokens, mapped to target ids (target = draft id + d2t[draft id])."""
    vd = draft.lm_head.weight.shape[0]
    rows = max(1, max_logits // vd)
    out = [draft.draft_to_target(draft.logits(h[i:i + rows]).argmax(dim=-1)) for i in range(0, h.shape[0], rows)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=h.device)


def _groups(cs: ContinuationSet, max_positions: int) -> list[list[int]]:
    """Consecutive prompts packed into forwards of at most `max_positions` elements (≥ 1 prompt each)."""
    groups: list[list[int]] = []
    size = 0
    for j in range(len(cs)):
        n = len(cs.prompt_ids[j]) + len(cs.continuations[j]) - 1
        if groups and size + n <= max_positions:
            groups[-1].append(j)
            size += n
        else:
            groups.append([j])
            size = n
    return groups


def _check_compatible(draft: PEagleDraft, cs: ContinuationSet) -> None:
    cfg = draft.config
    if cfg.aux_layer_ids is not None and tuple(cfg.aux_layer_ids) != tuple(cs.aux_layer_ids):
        raise EvalError(f"the draft was trained on aux layers {tuple(cfg.aux_layer_ids)} but the target states "
                        f"were captured at {tuple(cs.aux_layer_ids)}")
    if cs.aux and cs.aux[0].shape[-1] != cfg.fc_in_features:
        raise EvalError(f"target aux states have width {cs.aux[0].shape[-1]}, the draft's fc expects "
                        f"{cfg.fc_in_features}")


@torch.no_grad()
def draft_token_tables(
    draft: PEagleDraft,
    cs: ContinuationSet,
    k: int,
    *,
    max_positions: int = 8192,
    chunk_elements: int = 8192,
    progress: bool = False,
) -> list[Tensor]:
    """Per prompt, the draft's greedy tokens [n_j, K] (target ids; row = anchor, column = depth).

    One teacher-forced forward per group of prompts (packed as separate documents): the depth-0
    stream (every position, real token + aux) runs once through `peagle.model.mask.CODAttention`, its
    per-layer keys/values are kept, and the mask slots (depth ≥ 1, mask token + projected
    mask_hidden, position anchor + depth) of anchors that can be visited by a round (a ≥ P − 1,
    reference inside the output) run in chunks of whole chains against that context — exactly the
    COD mask, so results do not depend on the chunking. Entries that no round can read are −1.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"K must be an int >= 1, got {k!r}")
    _check_compatible(draft, cs)
    was_training = draft.training
    draft.eval()
    device = draft.fc.weight.device
    dtype = draft.fc.weight.dtype
    tables: list[Tensor] = [torch.empty(0)] * len(cs)
    groups = _groups(cs, max_positions)
    bar = tqdm(total=sum(len(cs.sequence(j)) - 1 for j in range(len(cs))), desc="score", unit="pos",
               disable=not progress)
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            for grp in groups:
                for j, table in zip(grp, _score_group(draft, cs, grp, k, chunk_elements, device, dtype),
                                    strict=True):
                    tables[j] = table
                bar.update(sum(len(cs.sequence(j)) - 1 for j in grp))
    finally:
        bar.close()
        draft.train(was_training)
    return tables


def _score_group(
    draft: PEagleDraft, cs: ContinuationSet, grp: list[int], k: int, chunk_elements: int,
    device: torch.device, dtype: torch.dtype,
) -> list[Tensor]:
    """The tables of the prompts `grp`, run as one packed forward (one document per prompt)."""
    ids_parts, aux_parts, doc_parts, lo_parts, hi_parts = [], [], [], [], []
    offsets = []
    off = 0
    for local, j in enumerate(grp):
        ids_j, aux_j = shift_sequence(cs.sequence(j), cs.aux[j])
        n = ids_j.numel()
        offsets.append(off)
        ids_parts.append(ids_j)
        aux_parts.append(aux_j)
        doc_parts.append(torch.full((n,), local, dtype=torch.long))
        # anchors a round can visit: P−1 ≤ a ≤ T−3 = n−2 (every depth: vLLM counts drafts past the end)
        lo_parts.append(torch.full((n,), off + len(cs.prompt_ids[j]) - 1, dtype=torch.long))
        hi_parts.append(torch.full((n,), off + n - 2, dtype=torch.long))
        off += n
    total = off
    sizes = [len(cs.sequence(j)) - 1 for j in grp]
    if total == 0:
        return [torch.full((n, k), -1, dtype=torch.long) for n in sizes]
    ids = torch.cat(ids_parts).to(device)
    aux = torch.cat(aux_parts).to(device=device, dtype=dtype)
    docs = torch.cat(doc_parts).to(device)
    lo, hi = torch.cat(lo_parts).to(device), torch.cat(hi_parts).to(device)
    starts = document_starts(docs)
    flat = torch.arange(total, device=device)
    positions = flat - starts
    table = torch.full((total, k), -1, dtype=torch.long, device=device)

    # depth-0 stream: every position (prompt positions are context), keys/values recorded
    record: dict = {}
    attn0 = CODAttention(starts, flat, torch.empty((total, 0), dtype=torch.long, device=device),
                         num_context=total, record=record)
    h0 = draft(ids, draft.project_aux(aux), positions, attn0)
    context = [record[i] for i in range(len(record))]
    visit = (flat >= lo) & (flat <= hi)
    rows = visit.nonzero().squeeze(1)
    if rows.numel():
        table[rows, 0] = argmax_target_ids(draft, h0[rows])
    del h0

    if k > 1 and rows.numel():
        # every depth of every visited anchor (depth-major blocks, as COD lays them out); the depth-0
        # rows only keep the chains' element ids aligned and are not run (the stream above computed them)
        anchor = rows.repeat(k)
        depth = torch.arange(k, device=device).repeat_interleave(rows.numel())
        chain = chains(anchor, depth, k)
        deep = (depth > 0).nonzero().squeeze(1)
        deep = deep[torch.argsort(anchor[deep], stable=True)]  # whole chains, anchor order
        chain_anchors = torch.unique_consecutive(anchor[deep])
        per_chunk = max(1, chunk_elements // (k - 1))
        bounds = torch.searchsorted(anchor[deep].contiguous(), chain_anchors[::per_chunk].contiguous())
        bounds = torch.cat([bounds, torch.tensor([deep.numel()], device=device)])
        for c in range(bounds.numel() - 1):
            elems = deep[int(bounds[c]):int(bounds[c + 1])]
            a, d = anchor[elems], depth[elems]
            attn = CODAttention(starts[a], a, local_chains(chain[elems], elems, anchor.numel()), context=context)
            slot_ids, slot_hidden = draft.mask_slots(elems.numel(), dtype)
            h = draft(slot_ids, slot_hidden, positions[a] + d, attn)
            table[a, d] = argmax_target_ids(draft, h)
    table = table.cpu()
    return [table[o:o + n] for o, n in zip(offsets, sizes, strict=True)]


def acceptance_on(
    draft: PEagleDraft, continuation_set: ContinuationSet, k: int | None = None, *,
    max_positions: int = 8192, chunk_elements: int = 8192,
) -> dict[str, Any]:
    """Re-score a draft on a prepared set: vLLM metrics at K plus AL for every K' ≤ K.

    The cheap entry point for the training loop (one forward, no target, no generation). Returns
    `acceptance_metrics(...)` at K plus "acceptance_length_by_k" {K': AL} and "num_speculative_tokens".
    The draft is put in eval mode, run without autocast and returned to its previous mode.
    """
    k = int(k if k is not None else draft.config.num_speculative_tokens)
    tables = draft_token_tables(draft, continuation_set, k, max_positions=max_positions,
                                chunk_elements=chunk_elements)
    overall, by_k, _ = summarise(continuation_set, rounds_by_k(continuation_set, tables, k), k)
    useful = metrics_by_k(rounds_by_k(continuation_set, tables, k, useful=True), k)
    return {**overall, "num_speculative_tokens": k,
            "acceptance_length_by_k": {kk: m["acceptance_length"] for kk, m in by_k.items()},
            "useful_acceptance_length_by_k": {kk: m["acceptance_length"] for kk, m in useful.items()}}
