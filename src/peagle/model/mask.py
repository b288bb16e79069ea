"""The COD attention predicate, in one place, used three ways.

Query element q may attend key element k iff q is not padding, both anchors lie in the same
document, and either k is real context at or before q's anchor (depth_k = 0, anchor_k ≤ anchor_q)
or k is on q's own chain at an earlier or equal depth (anchor_k = anchor_q, depth_k ≤ depth_q).
This is what vLLM's parallel-drafting runtime shows a mask slot (docs/conventions.md, "Flat input and mask").

1. `cod_mask`: the dense boolean [M, M] reference (tests, small inputs, the SDPA baseline).
2. `cod_block_mask` + `FlexCODAttention`: FlexAttention for CUDA (compiled, dynamic shapes).
3. `peagle.model.tiled_attention.CODAttention`: the structured path that trains anywhere, CPU
   included (its own module: a custom-autograd tiled kernel over the same predicate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cod_mask(anchor: Tensor, depth: Tensor, document_ids: Tensor) -> Tensor:
    """Dense COD visibility [M, M] (query rows, key columns); document_ids is over positions."""
    doc = document_ids[anchor]
    same_doc = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    real_context = (depth[None, :] == 0) & (anchor[None, :] <= anchor[:, None])
    own_chain = (anchor[None, :] == anchor[:, None]) & (depth[None, :] <= depth[:, None])
    return same_doc & (real_context | own_chain)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Reference attention with a dense boolean mask through SDPA; rows with no visible key give 0."""
    empty = ~mask.any(dim=1)
    safe = mask | torch.diag_embed(empty)  # let empty rows see themselves, then zero them
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=safe, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    ).transpose(0, 1)
    return out.masked_fill(empty[:, None, None], 0.0)


class DenseCODAttention:
    """The COD mask materialised once per forward and applied with SDPA (the baseline path)."""

    def __init__(self, anchor: Tensor, depth: Tensor, document_ids: Tensor):
        self.mask = cod_mask(anchor, depth, document_ids)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return dense_attention(q, k, v, self.mask)


def cod_block_mask(anchor: Tensor, depth: Tensor, document_ids: Tensor, block_size: int = 128):
    """FlexAttention BlockMask of the COD predicate (same rule as `cod_mask`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids[anchor]

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = (doc[q_idx] == doc[kv_idx]) & (doc[q_idx] >= 0)
        real_context = (depth[kv_idx] == 0) & (anchor[kv_idx] <= anchor[q_idx])
        own_chain = (anchor[kv_idx] == anchor[q_idx]) & (depth[kv_idx] <= depth[q_idx])
        return same_doc & (real_context | own_chain)

    m = anchor.numel()
    return create_block_mask(mask_mod, None, None, m, m, device=anchor.device, BLOCK_SIZE=block_size)


_compiled_flex = None


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


class FlexCODAttention:
    """Compiled FlexAttention with the COD BlockMask (CUDA training; CPU forward only in torch 2.13)."""

    def __init__(self, anchor: Tensor, depth: Tensor, document_ids: Tensor, compiled: bool = True):
        self.block_mask = cod_block_mask(anchor, depth, document_ids)
        if compiled:
            self.fn = _flex()
        else:
            from torch.nn.attention.flex_attention import flex_attention

            self.fn = flex_attention

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = self.fn(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[0].transpose(0, 1)
