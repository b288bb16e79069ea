"""peagle.model.loss: chunked KL equals the plain full-tensor computation, in value, gradients and metrics."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from peagle.model.loss import LossSums, TargetHead, kl_loss, loss_divisor


def make_case(E=10, H=8, Vd=12, K=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(E, H, generator=g).to(dtype)
    weight = torch.randn(Vd, H, generator=g).to(dtype)
    target_logits = 3 * torch.randn(E, Vd, generator=g)
    depth = torch.randint(0, K, (E,), generator=g)
    return hidden, weight, target_logits, depth


def reference(hidden, weight, target_logits, depth, K):
    """Full [E, Vd] tensors, F.kl_div, autograd."""
    log_q = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1)
    log_p = torch.log_softmax(target_logits.float(), dim=-1)
    per_elem = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    kl_per_depth = torch.zeros(K).index_add(0, depth, per_elem.detach())
    correct = torch.zeros(K).index_add(0, depth, (log_q.argmax(-1) == log_p.argmax(-1)).float())
    count = torch.bincount(depth, minlength=K).float()
    return per_elem.sum(), kl_per_depth, correct, count


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 2048])
def test_matches_reference_values_and_gradients(chunk_size):
    K = 4
    hidden, weight, target_logits, depth = make_case(K=K)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    out = kl_loss(h1, w1, depth, K, target_logits=target_logits, chunk_size=chunk_size)
    ref_sum, ref_kl, ref_correct, ref_count = reference(h2, w2, target_logits, depth, K)

    assert isinstance(out, LossSums)
    torch.testing.assert_close(out.kl_sum, ref_sum)
    torch.testing.assert_close(out.kl_per_depth, ref_kl)
    torch.testing.assert_close(out.correct_per_depth, ref_correct)
    torch.testing.assert_close(out.count_per_depth, ref_count)
    assert not out.kl_per_depth.requires_grad and not out.correct_per_depth.requires_grad
    torch.testing.assert_close(out.kl_per_depth.sum(), out.kl_sum, rtol=1e-6, atol=1e-6)

    (0.37 * out.kl_sum).backward()
    (0.37 * ref_sum).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_target_head_form_equals_logits_form():
    E, Ht, V, K = 9, 8, 20, 3
    g = torch.Generator().manual_seed(1)
    hidden, weight, _, depth = make_case(E=E, H=Ht, Vd=12, K=K)
    target_hidden = torch.randn(E, Ht, generator=g)
    norm_w = torch.rand(Ht, generator=g) + 0.5
    lm_head_full = torch.randn(V, Ht, generator=g)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.randperm(V, generator=g)[:12]] = True
    head = TargetHead.from_weights(norm_w, 1e-6, lm_head_full, t2d)
    assert list(head.parameters()) == [] and head.weight.shape == (12, Ht)

    # The target's logits computed by hand, then restricted to the draft vocab.
    normed = target_hidden * torch.rsqrt(target_hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
    target_logits = (normed @ lm_head_full.T)[:, t2d]
    torch.testing.assert_close(head(target_hidden), target_logits)

    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    a = kl_loss(h1, weight, depth, K, target_logits=target_logits, chunk_size=4)
    b = kl_loss(h2, weight, depth, K, target_hidden=target_hidden, target_head=head, chunk_size=4)
    torch.testing.assert_close(a.kl_sum, b.kl_sum)
    torch.testing.assert_close(a.correct_per_depth, b.correct_per_depth)
    a.kl_sum.backward()
    b.kl_sum.backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    assert target_hidden.grad is None


def test_top1_hand_case():
    # W = identity: draft argmax of element e is the argmax of hidden[e].
    weight = torch.eye(4)
    hidden = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0], [5.0, 0, 0, 0]])
    target_logits = torch.tensor(
        [[9.0, 0, 0, 0], [9.0, 0, 0, 0], [0, 0, 9.0, 0], [0, 0, 9.0, 0], [9.0, 0, 0, 0]]
    )  # agree, disagree, agree, disagree, agree
    depth = torch.tensor([0, 0, 1, 1, 2])
    out = kl_loss(hidden, weight, depth, 3, target_logits=target_logits, chunk_size=2)
    assert out.correct_per_depth.tolist() == [1.0, 1.0, 1.0]
    assert out.count_per_depth.tolist() == [2.0, 2.0, 1.0]


def test_frozen_weight_gets_no_gradient():
    hidden, weight, target_logits, depth = make_case()
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out = kl_loss(h1, weight, depth, 4, target_logits=target_logits, chunk_size=3)
    out.kl_sum.backward()
    ref = reference(h2, weight, target_logits, depth, 4)[0]
    ref.backward()
    assert weight.grad is None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_compute_in_fp32_and_return_input_dtype_grads():
    hidden, weight, target_logits, depth = make_case(dtype=torch.bfloat16)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = kl_loss(h1, w1, depth, 4, target_logits=target_logits.bfloat16(), chunk_size=3)
    assert out.kl_sum.dtype == torch.float32
    out.kl_sum.backward()
    assert h1.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.bfloat16
    # fp32 reference on the same (bf16-representable) values.
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = reference(h2, w2, target_logits.bfloat16().float(), depth, 4)[0]
    ref.backward()
    torch.testing.assert_close(out.kl_sum, ref)
    torch.testing.assert_close(h1.grad.float(), h2.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w1.grad.float(), w2.grad, rtol=1e-2, atol=1e-2)


def test_empty_and_bad_arguments():
    hidden, weight, target_logits, depth = make_case()
    h = hidden[:0].clone().requires_grad_()
    out = kl_loss(h, weight, depth[:0], 4, target_logits=target_logits[:0])
    assert out.kl_sum.item() == 0 and out.count_per_depth.sum().item() == 0
    out.kl_sum.backward()
    assert h.grad.shape == (0, hidden.shape[1])
    with pytest.raises(ValueError, match="exactly one"):
        kl_loss(hidden, weight, depth, 4)
    with pytest.raises(ValueError, match="exactly one"):
        kl_loss(hidden, weight, depth, 4, target_logits=target_logits, target_hidden=hidden)
    with pytest.raises(ValueError, match="target_head"):
        kl_loss(hidden, weight, depth, 4, target_hidden=hidden)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op allocates (views of existing storage do not count)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_materialises_elements_by_vocab():
    E, H, Vd, chunk = 64, 8, 50, 16
    hidden, weight, target_logits, depth = make_case(E=E, H=H, Vd=Vd)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _MaxNumel() as mode:
        out = kl_loss(h, w, depth, 4, target_logits=target_logits, chunk_size=chunk)
        out.kl_sum.backward()
    assert mode.max_numel <= chunk * Vd < E * Vd


def test_autocast_does_not_lower_precision():
    hidden, weight, target_logits, depth = make_case()
    plain = kl_loss(hidden, weight, depth, 4, target_logits=target_logits, chunk_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = kl_loss(hidden, weight, depth, 4, target_logits=target_logits, chunk_size=3)
    assert torch.equal(plain.kl_sum, auto.kl_sum)


@pytest.mark.parametrize("keep_chunks", [0, 1, 99])
def test_kept_and_recomputed_chunks_give_the_same_gradients(keep_chunks, monkeypatch):
    """The forward keeps q − p of the first chunks within a byte budget and the backward recomputes the
    rest: none, some or all kept, the gradients are the reference's."""
    import peagle.model.loss as loss_mod

    K, chunk = 4, 3
    hidden, weight, target_logits, depth = make_case(K=K)
    monkeypatch.setattr(loss_mod, "_KEEP_BYTES", keep_chunks * chunk * weight.shape[0] * 4)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (0.37 * kl_loss(h1, w1, depth, K, target_logits=target_logits, chunk_size=chunk).kl_sum).backward()
    (0.37 * reference(h2, w2, target_logits, depth, K)[0]).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep_chunks", [0, 1, 99])
def test_depth_weights_match_the_weighted_reference(keep_chunks, monkeypatch):
    """kl_sum = Σ_d w_d · (KL summed over depth d), its gradient the weighted reference's, whether the
    backward reuses the forward's q − p or recomputes it; the per-depth metrics stay unweighted; the
    elements are given unsorted by target row (kl_loss sorts them: the weights must follow)."""
    import peagle.model.loss as loss_mod

    K, chunk = 4, 3
    hidden, weight, target_logits, depth = make_case(E=13, K=K, seed=5)
    target_index = torch.randperm(13, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([0.5, 2.0, 0.25, 3.0])
    monkeypatch.setattr(loss_mod, "_KEEP_BYTES", keep_chunks * chunk * weight.shape[0] * 4)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = kl_loss(h1, w1, depth, K, target_logits=target_logits, target_index=target_index, chunk_size=chunk,
                  depth_weight=w)
    log_q = torch.log_softmax(h2 @ w2.T, dim=-1)
    log_p = torch.log_softmax(target_logits[target_index], dim=-1)
    per_elem = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    ref = (w[depth] * per_elem).sum()
    torch.testing.assert_close(out.kl_sum, ref)
    torch.testing.assert_close(out.kl_per_depth, torch.zeros(K).index_add(0, depth, per_elem.detach()))
    (0.37 * out.kl_sum).backward()
    (0.37 * ref).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_loss_divisor_hand_cases():
    counts = torch.tensor([10.0, 4.0, 0.0, 2.0], dtype=torch.float64)
    assert loss_divisor(counts, "elements") == 16.0
    assert loss_divisor(counts, "depths") == (40.0, 16.0, 4.0, 8.0)  # K · count_d, an empty depth counts 1
    assert loss_divisor(torch.zeros(3), "elements") == 1.0
    with pytest.raises(ValueError, match="elements' or 'depths'"):
        loss_divisor(counts, "tokens")
    with pytest.raises(ValueError, match=r"depth_weight must have shape \(4,\)"):
        hidden, weight, target_logits, depth = make_case(K=4)
        kl_loss(hidden, weight, depth, 4, target_logits=target_logits, depth_weight=torch.ones(3))
