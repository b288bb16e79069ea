"""peagle.data.vocab: draft vocabulary from supervised token counts, mask_token_id choice and checks."""

from __future__ import annotations

import pytest
import torch
from conftest import build_chat_tokenizer

from peagle.data.vocab import build_draft_vocab, check_mask_token, choose_mask_token


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
    assert choose_mask_token(chat_tokenizer, n + 8).token_id == n
    assert choose_mask_token(chat_tokenizer, n + 8, requested=n + 3).token_id == n + 3
    assert choose_mask_token(chat_tokenizer, n + 8, requested="5", token_counts_all=None).token_id == 5


def test_choose_mask_token_auto_reserved_token(chat_tokenizer):
    n = len(chat_tokenizer)
    r0 = chat_tokenizer.convert_tokens_to_ids("<|reserved_0|>")
    r1 = chat_tokenizer.convert_tokens_to_ids("<|reserved_1|>")
    assert choose_mask_token(chat_tokenizer, n).token_id == r0
    counts = torch.zeros(n, dtype=torch.long)
    counts[r0] = 1  # reserved_0 occurs in the data → skip it
    assert choose_mask_token(chat_tokenizer, n, token_counts_all=counts).token_id == r1
    counts[r1] = 3  # both reserved tokens used: the rules for full vocabularies take over
    choice = choose_mask_token(chat_tokenizer, n, token_counts_all=counts)
    assert choice.token_id not in (r0, r1) and counts[choice.token_id] == 0
    roles = {chat_tokenizer.bos_token_id, chat_tokenizer.eos_token_id, chat_tokenizer.pad_token_id}
    assert choice.token_id not in roles and "reserved" not in choice.reason


def test_choose_mask_token_explicit_checks(chat_tokenizer):
    n = len(chat_tokenizer)
    counts = torch.zeros(n + 2, dtype=torch.long)
    counts[10] = 1
    with pytest.raises(ValueError, match="out of range"):
        choose_mask_token(chat_tokenizer, n + 2, requested=n + 2, token_counts_all=counts)
    with pytest.raises(ValueError, match="occurs 1 times"):
        choose_mask_token(chat_tokenizer, n + 2, requested=10, token_counts_all=counts)
    with pytest.raises(ValueError, match="integer or 'auto'"):
        choose_mask_token(chat_tokenizer, n + 2, requested="maybe")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def full_vocab_tokenizer(tmp_path_factory):
    """A ChatML tokenizer whose every id is an embedding row (no spare row, no reserved token): as
    SmolLM2's. Specials: bos/eos/pad, the template's two markers, two added tokens no chat uses."""
    from transformers import AutoTokenizer

    d = build_chat_tokenizer(tmp_path_factory.mktemp("fullvocab"), CHATML,
                             ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>"],
                             bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>")
    return AutoTokenizer.from_pretrained(d)


def _counts_of(tok, texts, n):
    counts = torch.zeros(n, dtype=torch.long)
    for t in texts:
        for i in tok(t, add_special_tokens=False)["input_ids"]:
            counts[i] += 1
    return counts


def test_full_vocabulary_takes_an_added_token_the_data_and_template_never_use(full_vocab_tokenizer):
    tok = full_vocab_tokenizer
    n = len(tok)
    data = [tok.apply_chat_template([{"role": "user", "content": "count from 3 to 9"},
                                     {"role": "assistant", "content": "3 4 5 6 7 8 9"}], tokenize=False)]
    counts = _counts_of(tok, data, n)
    repo, sep = tok.convert_tokens_to_ids("<repo_name>"), tok.convert_tokens_to_ids("<file_sep>")
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    choice = choose_mask_token(tok, n, token_counts_all=counts)
    # bos/pad (<|endoftext|>, id 0) never occurs in this data but is special: skipped; the template's
    # markers occur; <repo_name> is the lowest added token left.
    assert counts[tok.convert_tokens_to_ids("<|endoftext|>")] == 0
    assert choice.token_id == min(repo, sep) and "added special token" in choice.reason

    counts[repo] = counts[sep] = 1  # data that uses every added token: the lowest id absent from the data
    choice = choose_mask_token(tok, n, token_counts_all=counts)
    roles = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    expect = min(i for i in range(n) if counts[i] == 0 and i not in roles | {start, end})
    assert choice.token_id == expect and "lowest id absent from the data" in choice.reason


def test_full_vocabulary_never_takes_what_the_template_writes(full_vocab_tokenizer):
    tok = full_vocab_tokenizer
    n = len(tok)
    counts = torch.ones(n, dtype=torch.long)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    counts[start] = 0  # absent from the (odd) data, but the template writes it at serving time
    with pytest.raises(ValueError, match="no free mask token"):
        choose_mask_token(tok, n, token_counts_all=counts)
    plain = tok("apple", add_special_tokens=False)["input_ids"][0]
    counts[plain] = 0
    assert choose_mask_token(tok, n, token_counts_all=counts).token_id == plain


def test_full_vocabulary_without_counts_is_a_clear_error(full_vocab_tokenizer):
    with pytest.raises(ValueError, match="--mask-token-id N"):
        choose_mask_token(full_vocab_tokenizer, len(full_vocab_tokenizer))


def test_real_smollm2_prepare_picks_an_added_token_its_data_never_uses(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct: 49152 embedding rows, all used by the tokenizer, no reserved token. prepare's
    default mask token is an added special token absent from the data, not bos/eos/pad, not templated."""
    import json

    from transformers import AutoTokenizer

    from peagle.data import load_prepared, prepare
    from peagle.target.hf import embedding_rows

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"count from {i} to {i + 4}"},
        {"role": "assistant", "content": " ".join(str(j) for j in range(i, i + 5))}]}) + "\n" for i in range(6)))
    rows = embedding_rows(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert rows == len(tok) == 49152  # no spare row
    summary = prepare(chats, smollm2_dir, tmp_path / "prep", max_length=256, vocab_size=rows, progress=False)
    p = load_prepared(summary.output_dir)
    mask = p.draft_choice["mask_token_id"]
    assert int(p.all_counts[mask]) == 0
    assert mask in {int(i) for i in tok.added_tokens_decoder}
    assert mask not in {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert mask not in tok(rendered, add_special_tokens=False)["input_ids"]
    assert "added special token" in p.manifest["draft_vocab"]["mask_token_reason"]
