"""The training step: flat forward, exact sequence partitions, global normalisation, learning."""

import pytest
import torch

from peagle import Batch, DraftConfig, PEagleDraft, PEagleTrainer
from peagle.model.loss import TargetHead, loss_divisor

H, V, VD, K = 32, 64, 48, 4


def make_draft(seed: int = 0, layers: int = 2, vd: int = VD, k: int = K) -> PEagleDraft:
    torch.manual_seed(seed)
    cfg = DraftConfig(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=48, vocab_size=V, num_hidden_layers=layers, draft_vocab_size=vd,
                      mask_token_id=V - 1, max_position_embeddings=256, num_speculative_tokens=k)
    return PEagleDraft(cfg).double()


def make_batch(layout, seed: int = 0, hidden_target: bool = False, vd: int = VD) -> Batch:
    """layout: per row a list of (doc length, padding after) runs."""
    g = torch.Generator().manual_seed(seed)
    n = max(sum(a + b for a, b in row) for row in layout)
    rows_docs, rows_loss, rows_seeds = [], [], []
    for r, row in enumerate(layout):
        docs, loss = [], []
        for i, (length, pad) in enumerate(row):
            docs += [i] * length + [-1] * pad
            loss += [False] + (torch.rand(length - 1, generator=g) < 0.8).tolist() + [False] * pad
        docs += [-1] * (n - len(docs))
        loss += [False] * (n - len(loss))
        rows_docs.append(docs)
        rows_loss.append(loss)
        rows_seeds.append([1000 * r + max(d, 0) + 7 * seed for d in docs])
    b = len(layout)
    extra = {"target_hidden": torch.randn(b, n, H, generator=g, dtype=torch.float64)} if hidden_target \
        else {"target_logits": 3 * torch.randn(b, n, vd, generator=g, dtype=torch.float64)}
    return Batch(
        input_ids=torch.randint(0, V - 1, (b, n), generator=g),
        aux_hidden=torch.randn(b, n, 3 * H, generator=g, dtype=torch.float64),
        loss_mask=torch.tensor(rows_loss), document_ids=torch.tensor(rows_docs),
        cod_seeds=torch.tensor(rows_seeds), **extra,
    )


LAYOUT = [[(9, 2), (7, 4)], [(12, 1), (6, 0)]]  # B = 2 rows, two documents each, padding


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("segments", [2, 3, 5])
def test_sequence_partitions_are_exact(segments):
    batch = make_batch(LAYOUT, seed=1)
    flat = PEagleTrainer(make_draft(), ratio=0.8, ratio_min=0.3)
    out = flat(batch)
    out.loss.backward()
    want = grads_of(flat)

    part = PEagleTrainer(make_draft(), ratio=0.8, ratio_min=0.3, sequence_partitions=segments)
    units = list(part.units(batch))
    assert len(units) >= 2
    total, charged = 0.0, []
    metrics = None
    for unit in units:
        o = part(unit)
        o.loss.backward()
        total += float(o.loss.detach())
        metrics = o.metrics if metrics is None else metrics + o.metrics
        if unit.charged is not None:
            charged += unit.charged.tolist()
    assert abs(total - float(out.loss.detach())) < 1e-10
    assert torch.equal(metrics.count_per_depth, out.metrics.count_per_depth)
    assert torch.allclose(metrics.kl_per_depth, out.metrics.kl_per_depth, atol=1e-9)
    # every supervised element charged in exactly one segment
    assert sorted(charged) == torch.nonzero(units[0].layout.supervised).squeeze(1).tolist()
    got = grads_of(part)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-10, rtol=1e-8), name


def test_partitioned_batch_runs_the_stream_forward_once():
    """S segments read one depth-0 stream forward: the draft sees N stream rows once per batch (not once
    more in the context unit), and the kept graph is released by the context unit."""
    batch = make_batch(LAYOUT, seed=1)
    part = PEagleTrainer(make_draft(), ratio=0.8, ratio_min=0.3, sequence_partitions=3)
    rows = []
    handle = part.draft.fc.register_forward_hook(lambda mod, inp, out: rows.append(out.shape[0]))
    units = list(part.units(batch))
    for unit in units:
        part(unit).loss.backward()
    handle.remove()
    n = units[0].layout.num_stream  # fc projects the stream's aux states (and each segment's mask row)
    assert [r for r in rows if r > 1] == [n]
    assert units[-1].shared.stream is None


def test_partitioned_units_touch_only_their_elements():
    batch = make_batch([[(30, 0)]], seed=2)
    part = PEagleTrainer(make_draft(), ratio=0.8, ratio_min=0.3, sequence_partitions=3)
    units = list(part.units(batch))
    lay = units[0].layout
    assert [u.kind for u in units] == ["segment"] * (len(units) - 1) + ["context"]
    for unit in units[:-1]:
        seg_deep = set(unit.deep.tolist())
        # a chain never straddles segments: all its deep elements are in this unit
        for e in unit.deep.tolist():
            same_anchor = torch.nonzero((lay.anchor == lay.anchor[e]) & (lay.depth > 0)).squeeze(1).tolist()
            assert set(same_anchor) <= seg_deep


def test_global_normaliser_accumulates_to_union_gradient():
    a = make_batch([[(10, 0), (8, 2)]], seed=3)
    b = make_batch([[(14, 6)]], seed=4)
    union = Batch(**{f: torch.cat([getattr(a, f), getattr(b, f)]) if getattr(a, f) is not None else None
                     for f in a.__dataclass_fields__})
    union_model = PEagleTrainer(make_draft())
    # the union row 1 must keep b's document seeds: they are per position, so concatenation keeps them
    union_model(union).loss.backward()
    want = grads_of(union_model)

    acc = PEagleTrainer(make_draft())
    total = acc.count_supervised(a) + acc.count_supervised(b)
    assert total == union_model.count_supervised(union)
    for mb in (a, b):
        acc(mb, normalizer=total).loss.backward()
    got = grads_of(acc)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-10), name


def test_mask_hidden_gradient_only_with_deeper_depths_and_all_layers_learn():
    batch = make_batch(LAYOUT, seed=5)
    one = PEagleTrainer(make_draft(layers=3, k=1))
    one(batch).loss.backward()
    assert one.draft.mask_hidden.grad is None or not one.draft.mask_hidden.grad.any()
    many = PEagleTrainer(make_draft(layers=3))
    many(batch).loss.backward()
    assert many.draft.mask_hidden.grad.abs().sum() > 0
    for i in range(3):
        g = many.draft.layers[i].mlp.down_proj.weight.grad
        assert g is not None and g.abs().sum() > 0, f"layer {i} got no gradient"


def test_deep_slots_carry_mask_token_and_projected_mask_hidden():
    """The trainer hands the draft the stream rows and the count of mask slots; the draft's shared
    slot input (layer 0 projects it once) equals spelling every slot out (values and gradients)."""
    batch = make_batch(LAYOUT, seed=6)
    trainer = PEagleTrainer(make_draft())
    draft, seen = trainer.draft, {}
    original = draft.forward

    def spy(ids, hidden, positions, attention, num_mask_slots=0):
        seen.update(ids=ids, hidden=hidden, positions=positions, attention=attention, slots=num_mask_slots)
        return original(ids, hidden, positions, attention, num_mask_slots)

    draft.forward = spy
    trainer(batch)
    n = batch.input_ids.numel()
    ids, hidden, positions, slots = seen["ids"], seen["hidden"], seen["positions"], seen["slots"]
    assert slots == positions.numel() - n > 0
    assert torch.equal(ids, batch.input_ids.reshape(-1))
    assert torch.allclose(hidden, draft.project_aux(batch.aux_hidden.reshape(n, -1)))
    hidden = hidden.detach()
    shared = original(ids, hidden, positions, seen["attention"], slots)
    mask_ids, mask_rows = draft.mask_slots(slots)
    assert (mask_ids == draft.config.mask_token_id).all()
    assert torch.allclose(mask_rows, draft.projected_mask_hidden().expand_as(mask_rows))
    spelled = original(torch.cat([ids, mask_ids]), torch.cat([hidden, mask_rows]), positions, seen["attention"])
    assert torch.allclose(shared, spelled, atol=1e-12)
    w = torch.randn_like(shared)
    params = [p for p in draft.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad((shared * w).sum(), params, allow_unused=True),
                    torch.autograd.grad((spelled * w).sum(), params, allow_unused=True), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-12)


def test_structured_and_dense_attention_paths_agree():
    batch = make_batch(LAYOUT, seed=7)
    outs = {}
    for mode in ("structured", "dense"):
        t = PEagleTrainer(make_draft(), attention=mode)
        o = t(batch)
        o.loss.backward()
        outs[mode] = (float(o.loss), grads_of(t))
    assert abs(outs["structured"][0] - outs["dense"][0]) < 1e-10
    for name, g in outs["dense"][1].items():
        assert torch.allclose(outs["structured"][1][name], g, atol=1e-10), name


def test_target_hidden_with_head_equals_target_logits():
    batch = make_batch(LAYOUT, seed=8, hidden_target=True)
    torch.manual_seed(1)
    head = TargetHead.from_weights(torch.rand(H, dtype=torch.float64) + 0.5, 1e-6,
                                   torch.randn(V, H, dtype=torch.float64))
    # same COD and draft: compare against explicit logits restricted to the (identity) draft vocab
    trainer_h = PEagleTrainer(make_draft(vd=V), target_head=head)
    logits = head(batch.target_hidden.reshape(-1, H)).reshape(*batch.input_ids.shape, V).double()
    batch_l = Batch(**{**batch.__dict__, "target_hidden": None, "target_logits": logits})
    trainer_l = PEagleTrainer(make_draft(vd=V))
    a, b = trainer_h(batch), trainer_l(batch_l)
    assert torch.allclose(a.loss.double(), b.loss.double(), atol=1e-5)


def test_rows_are_independent_documents():
    """A document's loss contribution does not depend on which row or batch it is in."""
    a = make_batch([[(10, 0)]], seed=9)
    t = PEagleTrainer(make_draft())
    alone = t(a).metrics
    pad = make_batch([[(6, 0)]], seed=10)
    n = 10
    both = Batch(
        input_ids=torch.cat([a.input_ids, torch.cat([pad.input_ids, pad.input_ids[:, :4]], 1)]),
        aux_hidden=torch.cat([a.aux_hidden, torch.cat([pad.aux_hidden, pad.aux_hidden[:, :4]], 1)]),
        loss_mask=torch.cat([a.loss_mask, torch.cat([pad.loss_mask, torch.zeros(1, 4, dtype=torch.bool)], 1)]),
        document_ids=torch.cat([a.document_ids, torch.tensor([[0] * 6 + [-1] * 4])]),
        target_logits=torch.cat([a.target_logits, torch.cat([pad.target_logits, pad.target_logits[:, :4]], 1)]),
        cod_seeds=torch.cat([a.cod_seeds, torch.full((1, n), 99)]),
    )
    together = t(both).metrics
    assert together.count_per_depth.sum() > alone.count_per_depth.sum()
    b_only = t(Batch(**{f: getattr(both, f)[1:] if getattr(both, f) is not None else None
                        for f in both.__dataclass_fields__})).metrics
    assert torch.allclose(together.kl_per_depth, alone.kl_per_depth + b_only.kl_per_depth, atol=1e-9)


def test_tiny_draft_overfits_a_fixed_batch():
    batch = make_batch([[(24, 0), (20, 4)], [(40, 8)]], seed=11)
    torch.manual_seed(0)
    trainer = PEagleTrainer(make_draft().float())
    batch = Batch(**{f: (getattr(batch, f).float() if getattr(batch, f) is not None
                         and getattr(batch, f).is_floating_point() else getattr(batch, f))
                     for f in batch.__dataclass_fields__})
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = trainer(batch).loss
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
    assert float(loss) < first / 5, (first, float(loss))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"sequence_partitions": 0}, "sequence_partitions"), ({"ratio": 0.0}, "ratio"),
     ({"ratio_min": 1.5}, "ratio_min")],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PEagleTrainer(make_draft(), **kwargs)


@pytest.mark.parametrize("k", [0, 2.0])
def test_k_is_validated_by_the_draft_config(k):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        make_draft(k=k)


def test_flat_unit_is_the_plain_forward():
    batch = make_batch(LAYOUT, seed=13)
    t = PEagleTrainer(make_draft())
    units = list(t.units(batch))
    assert [u.kind for u in units] == ["flat"]
    assert torch.equal(t(units[0]).loss, t(batch).loss)
    # the layout counted before the states exist is the one the forward uses
    tokens_only = Batch(**{**batch.__dict__, "aux_hidden": None, "target_logits": None})
    lay = t.layout(tokens_only)
    assert lay.supervised_count == int(t(batch).metrics.count_per_depth.sum())
    assert torch.equal(t(next(t.units(batch, lay))).loss, t(batch).loss)


def test_batch_shape_errors_are_clear():
    batch = make_batch(LAYOUT, seed=12)
    t = PEagleTrainer(make_draft())
    bad = Batch(**{**batch.__dict__, "aux_hidden": batch.aux_hidden[..., :10]})
    with pytest.raises(ValueError, match="aux_hidden"):
        t(bad)
    bad = Batch(**{**batch.__dict__, "target_logits": None})
    with pytest.raises(ValueError, match="exactly one"):
        t(bad)


@pytest.mark.parametrize("segments", [1, 3])
def test_per_depth_normaliser_is_the_mean_of_depth_means_and_accumulates(segments):
    """With K per-depth divisors (loss_normalization "depths") the loss is Σ_d KL_d / (K · n_d) by the
    step's own metrics; two micro-batches given the union's divisors sum to the union's loss and
    gradient, flat or sequence-partitioned."""
    a = make_batch([[(10, 0), (8, 2)]], seed=3)
    b = make_batch([[(14, 6)]], seed=4)
    union = Batch(**{f: torch.cat([getattr(a, f), getattr(b, f)]) if getattr(a, f) is not None else None
                     for f in a.__dataclass_fields__})
    ref = PEagleTrainer(make_draft(), ratio=0.8, ratio_min=0.3)
    counts = ref.layout(union).supervised_per_depth(K)
    assert counts.sum() == ref.count_supervised(union) and (counts > 0).all()
    divisor = loss_divisor(counts, "depths")
    out = ref(union, normalizer=divisor)
    m = out.metrics
    want_loss = sum(float(m.kl_per_depth[d]) / (K * float(m.count_per_depth[d])) for d in range(K))
    assert torch.equal(m.count_per_depth, counts)
    assert abs(float(out.loss) - want_loss) < 1e-9 * max(want_loss, 1.0)
    out.loss.backward()
    want = grads_of(ref)

    acc = PEagleTrainer(make_draft(), ratio=0.8, ratio_min=0.3, sequence_partitions=segments)
    total = 0.0
    for mb in (a, b):
        for unit in acc.units(mb):
            o = acc(unit, normalizer=divisor)
            o.loss.backward()
            total += float(o.loss.detach())
    assert abs(total - float(out.loss)) < 1e-9 * max(want_loss, 1.0)
    got = grads_of(acc)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-10, rtol=1e-8), name
