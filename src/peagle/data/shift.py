"""Stage 5 — the EAGLE shift (docs/conventions.md): THE one place it happens, on packed rows, per document.

Element j pairs token x[j+1] with aux state g[j], is supervised by the target at y[j+1] with loss
bit l[j+1]; the last position of every document becomes padding, so document runs stay contiguous.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from peagle.data.packing import positions_in_document


@dataclass
class Batch:
    """B packed rows, EAGLE-shifted: element j = (token x[j+1], aux g[j]), target y[j+1], loss bit l[j+1].

    The one record of a shifted batch, from `eagle_shift` to the trainer's loss. Element j is padding
    (document −1, loss 0, token 0) when j is padding, j is the last position of its row, or j+1 belongs
    to another document; several documents per row are allowed. position_ids = position of j within
    its document. Target states: ``aux_hidden`` and exactly one of ``target_hidden`` (the target's last
    hidden state, turned into logits by the trainer's frozen head) and ``target_logits`` (over the
    draft vocab); both are absent while the step only counts. cod_seeds: each position's document COD
    seed (sampling then depends only on the document); example_index: each position's example.
    """

    input_ids: Tensor
    loss_mask: Tensor
    document_ids: Tensor
    position_ids: Tensor | None = None
    aux_hidden: Tensor | None = None
    target_hidden: Tensor | None = None
    target_logits: Tensor | None = None
    cod_seeds: Tensor | None = None
    example_index: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                        for f in fields(self)})


def _shift_next(t: Tensor, dim: int) -> Tensor:
    """t[j+1] along ``dim``; the last slot gets zeros (it is padding anyway)."""
    out = torch.zeros_like(t)
    n = t.shape[dim]
    out.narrow(dim, 0, n - 1).copy_(t.narrow(dim, 1, n - 1))
    return out


def eagle_shift(
    input_ids: Tensor,
    loss_mask: Tensor,
    document_ids: Tensor,
    aux_hidden: Tensor | None = None,
    final_hidden: Tensor | None = None,
    *,
    example_index: Tensor | None = None,
    pad_token_id: int = 0,
) -> Batch:
    """Apply the EAGLE shift to packed rows ([B, n] or [n]; hidden tensors [..., n, H]).

    Element j pairs token x[j+1] with aux g[j] (same index), final/target hidden y[j+1] and loss bit
    l[j+1]. When j+1 is in another document, or j is the last position, element j becomes padding,
    so a document of N tokens yields N−1 elements and document runs stay contiguous (the last slot
    of every document becomes padding). ``example_index`` (per position) is kept at index j. The
    states may come later (`shift_states`): the tokens alone are enough to sample and count COD.
    """
    one_d = input_ids.dim() == 1
    if one_d:
        input_ids, loss_mask, document_ids = input_ids[None], loss_mask[None], document_ids[None]
        example_index = None if example_index is None else example_index[None]
    if input_ids.shape != loss_mask.shape or input_ids.shape != document_ids.shape:
        raise ValueError("input_ids, loss_mask and document_ids must have the same shape")
    next_doc = _shift_next(document_ids, 1)
    next_doc[:, -1] = -1
    valid = (document_ids >= 0) & (next_doc == document_ids)
    ids = torch.where(valid, _shift_next(input_ids, 1), torch.full_like(input_ids, pad_token_id))
    lm = _shift_next(loss_mask.bool(), 1) & valid
    docs = torch.where(valid, document_ids, torch.full_like(document_ids, -1))
    exi = None
    if example_index is not None:
        exi = torch.where(valid, example_index, torch.full_like(example_index, -1))
    out = Batch(ids, lm, docs, positions_in_document(docs), example_index=exi)
    if one_d:
        out = Batch(**{f.name: None if getattr(out, f.name) is None else getattr(out, f.name)[0]
                       for f in fields(out)})
    if aux_hidden is not None or final_hidden is not None:
        out = shift_states(out, aux_hidden, final_hidden)
    return out


def shift_states(batch: Batch, aux_hidden: Tensor | None, final_hidden: Tensor | None) -> Batch:
    """``batch`` (from `eagle_shift`) with the target states of its unshifted rows, shifted the same way.

    aux g[j] stays at j, the final hidden state y[j+1] moves to j (``target_hidden``); padding elements
    (document −1: exactly the ones `eagle_shift` invalidated) get zeros.
    """
    valid = batch.document_ids >= 0
    aux = tgt = None
    if aux_hidden is not None:
        valid = valid.to(aux_hidden.device)
        aux = torch.where(valid[..., None], aux_hidden, torch.zeros((), dtype=aux_hidden.dtype,
                                                                   device=aux_hidden.device))
    if final_hidden is not None:
        valid = valid.to(final_hidden.device)
        tgt = torch.where(valid[..., None], _shift_next(final_hidden, -2),
                          torch.zeros((), dtype=final_hidden.dtype, device=final_hidden.device))
    return dataclasses.replace(batch, aux_hidden=aux, target_hidden=tgt)
