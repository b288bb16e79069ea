"""bf16 training (autocast, fp32 master weights, fp32 loss maths) against fp32 on the same batch.

Tolerances: bf16 keeps 8 significand bits, so one rounding is up to 2^-9 ≈ 0.2 % relative; a step
chains ~2 layers of projections, attention and the SwiGLU, each rounding its inputs and outputs, and
the KL is computed in fp32 from bf16 logits. Measured here: loss within ~0.3 %, gradient directions
with cosine > 0.999. The asserted bounds (loss 2 %, cosine 0.99, norm 5 %) leave room for other CPUs'
kernels while still failing on a real bug (a wrong mask or a missed gradient moves these by far more).
FlexAttention has no backward on CPU in torch 2.13: its bf16 forward is compared instead.
"""

from __future__ import annotations

import pytest
import torch
from test_step import LAYOUT, grads_of, make_batch, make_draft

from peagle import Batch, PEagleTrainer
from peagle.model.mask import DenseCODAttention, FlexCODAttention


def _fp32(batch: Batch) -> Batch:
    return Batch(**{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in vars(batch).items()})


def _step(attention: str, bf16: bool, partitions: int = 1, seed: int = 7):
    trainer = PEagleTrainer(make_draft().float(), attention=attention, sequence_partitions=partitions)
    batch = _fp32(make_batch(LAYOUT, seed=seed))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if partitions == 1:
            out = trainer(batch)
            out.loss.backward()
            loss = float(out.loss)
        else:
            loss = 0.0
            for unit in trainer.units(batch):
                out = trainer(unit)
                out.loss.backward()
                loss += float(out.loss)
    assert all(p.dtype == torch.float32 for p in trainer.parameters())  # master weights stay fp32
    return loss, grads_of(trainer)


def _close(a: dict, b: dict, cosine: float, norm: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name].flatten().double(), b[name].flatten().double()
        assert torch.isfinite(x).all(), name
        if y.norm() == 0:
            continue
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > cosine, name
        assert abs(x.norm() / y.norm() - 1) < norm, name


@pytest.mark.parametrize("attention", ["structured", "dense"])
def test_bf16_step_matches_fp32(attention):
    loss32, grads32 = _step(attention, bf16=False)
    loss16, grads16 = _step(attention, bf16=True)
    assert abs(loss16 / loss32 - 1) < 2e-2
    _close(grads16, grads32, cosine=0.99, norm=5e-2)


def test_bf16_structured_equals_dense_and_partitions_equal_flat():
    flat = _step("structured", bf16=True)
    for other in (_step("dense", bf16=True), _step("structured", bf16=True, partitions=3)):
        assert abs(other[0] / flat[0] - 1) < 1e-2  # the same maths grouped differently: bf16 rounding only
        _close(other[1], flat[1], cosine=0.995, norm=2e-2)


def test_bf16_flex_forward_matches_dense():
    g = torch.Generator().manual_seed(3)
    m, hq, hkv, d = 40, 4, 2, 16
    anchor = torch.cat([torch.arange(20), torch.arange(3, 15), torch.arange(3, 11)])
    depth = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(12, dtype=torch.long),
                       torch.full((8,), 2, dtype=torch.long)])
    docs = torch.tensor([0] * 12 + [1] * 8)
    q, k, v = (torch.randn(m, h, d, generator=g).bfloat16() for h in (hq, hkv, hkv))
    want = DenseCODAttention(anchor, depth, docs)(0, q.float(), k.float(), v.float())
    got = FlexCODAttention(anchor, depth, docs, compiled=False)(0, q, k, v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_bf16_training_lowers_the_loss():
    trainer = PEagleTrainer(make_draft().float(), attention="structured", sequence_partitions=2)
    batch = _fp32(make_batch(LAYOUT, seed=11))
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        total = 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for unit in trainer.units(batch):
                out = trainer(unit)
                out.loss.backward()
                total += float(out.loss)
        opt.step()
        losses.append(total)
    assert losses[-1] < 0.8 * losses[0] and sorted(losses, reverse=True) == losses, losses
