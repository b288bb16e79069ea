"""peagle.data.vocab: draft vocabulary from supervised token counts, mask_token_id choice and checks."""

from __future__ import annotations

import pytest
import torch

from peagle.data.vocab import build_draft_vocab, check_mask_token, choose_mask_token_id


def test_draft_vocab_top_n_ties_by_id_sorted():
    counts = torch.tensor([0, 5, 3, 5, 0, 9, 3, 1])
    v = build_draft_vocab(counts, 4)
    # 9 (id 5), 5 (ids 1, 3), then 3: ids 2 and 6 tie → lower id 2 wins.
    assert v.draft_ids.tolist() == [1, 2, 3, 5]
    assert v.d2t.tolist() == [1, 1, 1, 2]  # offsets: target = draft + d2t[draft]
    assert v.t2d.tolist() == [False, True, True, True, False, True, False, False]
    assert v.to_target(torch.arange(4)).tolist() == [1, 2, 3, 5]
    assert v.coverage == pytest.approx(22 / 26)
    assert int(v.t2d.sum()) == v.size == 4 and not v.is_identity


def test_draft_vocab_pads_with_lowest_unused_ids():
    counts = torch.tensor([0, 0, 7, 0, 2, 0])
    v = build_draft_vocab(counts, 4)
    assert v.draft_ids.tolist() == [0, 1, 2, 4]
    assert v.coverage == 1.0


def test_draft_vocab_identity_and_range():
    counts = torch.tensor([3, 0, 1])
    v = build_draft_vocab(counts, 3)
    assert v.is_identity and v.d2t.tolist() == [0, 0, 0] and v.t2d.all() and v.coverage == 1.0
    for bad in (0, 4):
        with pytest.raises(ValueError, match=r"draft_vocab_size must be in \[1, 3\]"):
            build_draft_vocab(counts, bad)


def test_draft_vocab_random_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 6, (200,), generator=g)
    v = build_draft_vocab(counts, 37)
    expect = sorted(sorted(range(200), key=lambda i: (-int(counts[i]), i))[:37])
    assert v.draft_ids.tolist() == expect
    assert torch.equal(torch.arange(37) + v.d2t, v.draft_ids)


def test_check_mask_token():
    counts = torch.tensor([4, 0, 2, 0])
    assert check_mask_token(1, 4, counts) == 1
    with pytest.raises(ValueError, match="out of range"):
        check_mask_token(4, 4, counts)
    with pytest.raises(ValueError, match="out of range"):
        check_mask_token(-1, 4)
    with pytest.raises(ValueError, match="occurs 2 times"):
        check_mask_token(2, 4, counts)


def test_choose_mask_token_auto_spare_embedding_row(chat_tokenizer):
    n = len(chat_tokenizer)
    assert choose_mask_token_id(chat_tokenizer, n + 8) == n
    assert choose_mask_token_id(chat_tokenizer, n + 8, requested=n + 3) == n + 3
    assert choose_mask_token_id(chat_tokenizer, n + 8, requested="5", token_counts_all=None) == 5


def test_choose_mask_token_auto_reserved_token(chat_tokenizer):
    n = len(chat_tokenizer)
    r0 = chat_tokenizer.convert_tokens_to_ids("<|reserved_0|>")
    r1 = chat_tokenizer.convert_tokens_to_ids("<|reserved_1|>")
    assert choose_mask_token_id(chat_tokenizer, n) == r0
    counts = torch.zeros(n, dtype=torch.long)
    counts[r0] = 1  # reserved_0 occurs in the data → skip it
    assert choose_mask_token_id(chat_tokenizer, n, token_counts_all=counts) == r1
    counts[r1] = 3
    with pytest.raises(ValueError, match="--mask-token-id"):
        choose_mask_token_id(chat_tokenizer, n, token_counts_all=counts)


def test_choose_mask_token_explicit_checks(chat_tokenizer):
    n = len(chat_tokenizer)
    counts = torch.zeros(n + 2, dtype=torch.long)
    counts[10] = 1
    with pytest.raises(ValueError, match="out of range"):
        choose_mask_token_id(chat_tokenizer, n + 2, requested=n + 2, token_counts_all=counts)
    with pytest.raises(ValueError, match="occurs 1 times"):
        choose_mask_token_id(chat_tokenizer, n + 2, requested=10, token_counts_all=counts)
    with pytest.raises(ValueError, match="integer or 'auto'"):
        choose_mask_token_id(chat_tokenizer, n + 2, requested="maybe")
