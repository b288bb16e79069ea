"""peagle.target.hf: hooked aux/final states, per-document packing, logits, TargetHead, bad paths."""

from __future__ import annotations

import pytest
import torch
from conftest import CHATS

from peagle.data import collate, pack, tokenize_chat
from peagle.model.config import default_aux_layer_ids
from peagle.target.hf import Target, TargetError, block_causal_mask


@pytest.fixture(scope="module")
def examples(chat_tokenizer):
    return [tokenize_chat(chat_tokenizer, c, 64) for c in CHATS]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def target(request, llama_dir, qwen3_dir):
    return Target(llama_dir if request.param == "llama" else qwen3_dir, device="cpu")


def _packed(examples, max_length=64):
    rows = pack([len(e.input_ids) for e in examples], max_length)
    assert any(len(r) > 1 for r in rows)  # at least one row really holds several documents
    return rows, collate(examples, rows, max_length)


def test_loaded_frozen_eval_fp32(target):
    assert target.dtype == torch.float32
    assert not target.model.training
    assert all(not p.requires_grad for p in target.model.parameters())
    assert target.aux_layer_ids == default_aux_layer_ids(target.num_layers)


@pytest.mark.parametrize("position_packing", [False, True])
def test_packed_rows_equal_documents_alone(target, examples, position_packing):
    rows, p = _packed(examples)
    aux, final = target.hidden_states(p.input_ids, p.document_ids, use_position_packing=position_packing)
    H = target.hidden_size
    assert aux.shape == (len(rows), 64, 3 * H) and final.shape == (len(rows), 64, H)
    for b, row in enumerate(rows):
        off = 0
        for i in row:
            x = torch.tensor(examples[i].input_ids)
            a1, f1 = target.hidden_states(x)
            n = x.numel()
            torch.testing.assert_close(aux[b, off:off + n], a1, atol=1e-5, rtol=0)
            torch.testing.assert_close(final[b, off:off + n], f1, atol=1e-5, rtol=0)
            off += n


def test_packing_isolation_is_not_trivial(target, examples):
    # Without the per-document mask a second document would see the first: states differ.
    rows, p = _packed(examples)
    b = next(i for i, r in enumerate(rows) if len(r) > 1)
    plain_doc = torch.where(p.document_ids[b] >= 0, 0, -1)[None]
    aux_plain, _ = target.hidden_states(p.input_ids[b:b + 1], plain_doc,
                                        position_ids=p.position_ids[b:b + 1])
    aux, _ = target.hidden_states(p.input_ids[b:b + 1], p.document_ids[b:b + 1])
    second = p.document_ids[b] == 1
    assert (aux_plain[0, second] - aux[0, second]).abs().max() > 1e-3


def test_aux_and_final_match_hf(target, examples):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(target.path)
    x = torch.tensor(examples[0].input_ids)[None]
    out = m(x, output_hidden_states=True)
    aux, final = target.hidden_states(x)
    H = target.hidden_size
    for k, i in enumerate(target.aux_layer_ids):  # HF hidden_states[i] = input of layer i
        torch.testing.assert_close(aux[..., k * H:(k + 1) * H], out.hidden_states[i], atol=1e-5, rtol=0)
    t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
    t2d[::3] = True
    t2d[-1] = True
    torch.testing.assert_close(target.logits_from_final(final, t2d), out.logits[..., t2d], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(target.logits_from_final(final), out.logits, atol=1e-4, rtol=1e-5)
    head = target.head(t2d)
    torch.testing.assert_close(head(final[0]), out.logits[0][:, t2d], atol=1e-4, rtol=1e-5)


def test_eager_attention_and_custom_layers(llama_dir, examples):
    t = Target(llama_dir, device="cpu", attn_implementation="eager", aux_layer_ids=(1, 6, 0))
    assert t.aux_layer_ids == (0, 1, 6)  # increasing order, as vLLM feeds them
    rows, p = _packed(examples)
    aux, final = t.hidden_states(p.input_ids, p.document_ids)
    b = next(i for i, r in enumerate(rows) if len(r) > 1)
    i = rows[b][1]
    x = torch.tensor(examples[i].input_ids)
    a1, f1 = t.hidden_states(x)
    sel = p.document_ids[b] == 1
    torch.testing.assert_close(aux[b, sel], a1, atol=1e-5, rtol=0)
    torch.testing.assert_close(aux[b, sel][:, 128:192], final[b, sel])  # id L = input of the final norm
    with pytest.raises(TargetError, match="out of range"):
        Target(llama_dir, device="cpu", aux_layer_ids=(2, 3, 7))
    with pytest.raises(TargetError, match="repeat a layer"):
        Target(llama_dir, device="cpu", aux_layer_ids=(2, 3, 3))


def test_default_aux_layer_ids_are_distinct_for_every_depth():
    """vLLM's (2, L//2, L−3) where it is valid; for small targets distinct ids inside 0..L (hand-listed)."""
    assert default_aux_layer_ids(32) == (2, 16, 29) and default_aux_layer_ids(8) == (2, 4, 5)
    assert default_aux_layer_ids(7) == (2, 3, 4)
    assert default_aux_layer_ids(6) == (1, 3, 5)  # (2, 3, 3) would collapse in vLLM
    assert default_aux_layer_ids(5) == (1, 2, 4)
    assert default_aux_layer_ids(4) == (1, 2, 3)  # the demo target: (2, 2, 1) would crash vLLM
    assert default_aux_layer_ids(3) == (0, 1, 2)
    assert default_aux_layer_ids(2) == (0, 1, 2)
    for n in range(2, 80):
        ids = default_aux_layer_ids(n)
        assert len(set(ids)) == 3 and list(ids) == sorted(ids) and 0 <= ids[0] and ids[-1] <= n
    with pytest.raises(ValueError, match="no three distinct aux layers"):
        default_aux_layer_ids(1)


def test_block_causal_mask():
    doc = torch.tensor([[0, 0, 1, -1]])
    m = block_causal_mask(doc)[0, 0].long().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    add = block_causal_mask(doc, torch.float32)[0, 0]
    assert add[1, 0] == 0 and add[0, 1] == torch.finfo(torch.float32).min


def test_not_a_causal_lm(tmp_path, chat_tokenizer):
    from transformers import ViTConfig

    with pytest.raises(TargetError, match="no such path"):
        Target(tmp_path / "missing", device="cpu")
    chat_tokenizer.save_pretrained(tmp_path / "tok_only")
    with pytest.raises(TargetError, match=r"tok_only.*no config\.json"):
        Target(tmp_path / "tok_only", device="cpu")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32).save_pretrained(tmp_path / "vit")
    with pytest.raises(TargetError, match=r"vit is not a causal LM \(model_type='vit'"):
        Target(tmp_path / "vit", device="cpu")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_target_parts_equal_the_loaded_model(kind, llama_dir, qwen3_dir):
    """Training from a cache reads only embeddings, final norm and lm_head from the safetensors files:
    the same tensors and the same TargetHead logits as the whole loaded model."""
    from peagle.target.hf import TargetParts

    path = llama_dir if kind == "llama" else qwen3_dir
    full = Target(path, device="cpu")
    parts = TargetParts(path)
    assert parts.aux_layer_ids == full.aux_layer_ids and parts.vocab_size == full.vocab_size
    assert parts.hidden_size == full.hidden_size and parts.norm_eps == full.norm_eps
    assert torch.equal(parts.embed_weight, full.embed_weight) and torch.equal(parts.lm_head_weight, full.lm_head_weight)
    t2d = torch.zeros(full.vocab_size, dtype=torch.bool)
    t2d[::3] = True
    final = torch.randn(5, full.hidden_size)
    torch.testing.assert_close(parts.head(t2d)(final), full.head(t2d)(final), rtol=0, atol=0)
    with pytest.raises(TargetError, match="no such path"):
        TargetParts(path / "missing")
