"""peagle.eval: the one-pass acceptance simulation equals a literal speculative-decoding loop,
vLLM's metric definitions on hand-made sequences, d2t mapping, context rejection, plots, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import full_cod

from peagle.cli import _cmd_eval as _run_eval
from peagle.cli import build_parser
from peagle.eval import (
    ContinuationSet,
    EvalError,
    acceptance_metrics,
    acceptance_on,
    draft_token_tables,
    evaluate,
    greedy_generate,
    leading_matches,
    literal_speculative_decode,
    load_prompts,
    scalar_metrics,
    simulate_rounds,
    tokenize_prompts,
)
from peagle.eval.rounds import rounds_by_k
from peagle.model.cod import document_starts
from peagle.model.config import DraftConfig
from peagle.model.draft import PEagleDraft
from peagle.model.mask import DenseCODAttention
from peagle.target.hf import Target


def cli_main(argv: list[str]) -> int:  # `peagle eval ARGV` (the parser and command of peagle.cli)
    return _run_eval(build_parser().parse_args(["eval", *argv]))


K_MAX = 4
NEW_TOKENS = 14
PROMPTS = [
    {"prompt": "count from 3 to 9"},
    {"messages": [{"role": "user", "content": "sort these words: pear, apple, fig"},
                  {"role": "assistant", "content": "ignored reference answer"}]},
    {"text": "The word apple has"},
]

# ------------------------------------------------------------------------------------------------
# fixtures: a tiny target, its greedy continuations, and a draft trained a little on them


@pytest.fixture(scope="module")
def target(llama_dir):
    return Target(llama_dir, device="cpu")


@pytest.fixture(scope="module")
def cset(target):
    return ContinuationSet.prepare(target, PROMPTS, NEW_TOKENS, batch_size=2, lookahead=K_MAX - 1, progress=False)


def _new_draft(target, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = DraftConfig.from_target(target.config, mask_token_id=target.vocab_size - 1, num_hidden_layers=1,
                                  intermediate_size=64, num_speculative_tokens=K_MAX, **overrides)
    return PEagleDraft(cfg)


def _flat(cs, pad=0):
    """Shifted elements of every prompt as one document each, plus `pad` dummy elements at each end
    (causal attention keeps them invisible to real elements; they give the last anchors all depths)."""
    ids, aux, docs = [], [], []
    for j in range(len(cs)):
        seq = cs.sequence(j)
        n = len(seq) - 1
        ids.append(torch.tensor(seq[1:] + [0] * pad))
        aux.append(torch.cat([cs.aux[j][:n], torch.zeros(pad, cs.aux[j].shape[1])]))
        docs.append(torch.full((n + pad,), j))
    return torch.cat(ids), torch.cat(aux).float(), torch.cat(docs)


def _dense_forward(draft, cs, k, pad=0):
    """Reference: ONE flat forward over every (anchor, depth) with the dense COD mask."""
    ids, aux, docs = _flat(cs, pad)
    anchor, depth = full_cod(docs, k)
    pos = torch.arange(ids.numel()) - document_starts(docs)
    hidden = torch.where((depth == 0)[:, None], draft.project_aux(aux[anchor]), draft.projected_mask_hidden()[None])
    inp = torch.where(depth == 0, ids[anchor], draft.config.mask_token_id)
    h = draft(inp, hidden, pos[anchor] + depth, DenseCODAttention(anchor, depth, docs))
    return ids, docs, anchor, depth, h


def _train(draft, cs, steps, lr=3e-3):
    """A few CE steps towards the target's tokens, so acceptance is neither zero nor total."""
    opt = torch.optim.Adam(draft.parameters(), lr=lr)
    for _ in range(steps):
        ids, docs, anchor, depth, h = _dense_forward(draft, cs, K_MAX)
        n = ids.numel()
        nxt = (anchor + depth + 1).clamp(max=n - 1)
        ok = (anchor + depth + 1 < n) & (docs[nxt] == docs[anchor])
        labels = torch.where(ok, ids[nxt], -100)
        loss = F.cross_entropy(draft.logits(h), labels, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    draft.eval()
    return draft


@pytest.fixture(scope="module")
def draft(target, cset):
    return _train(_new_draft(target), cset, steps=40)


# ------------------------------------------------------------------------------------------------
# metrics and the round simulation on hand-made data


def test_acceptance_metrics_hand_made():
    m = acceptance_metrics([0, 2, 4, 1], 4)
    assert m["num_drafts"] == 4
    assert m["num_draft_tokens"] == 16
    assert m["num_accepted_tokens"] == 7
    assert m["acceptance_length"] == pytest.approx(2.75)  # 1 + 7/4
    assert m["per_position"] == pytest.approx([0.75, 0.5, 0.25, 0.25])  # ≥1, ≥2, ≥3, ≥4 accepted
    assert m["draft_acceptance_rate"] == pytest.approx(7 / 16)
    assert m["acceptance_length"] == pytest.approx(1 + sum(m["per_position"]))

    m = acceptance_metrics([3, 3, 0], 3)
    assert m["acceptance_length"] == pytest.approx(3.0)  # 1 + 6/3
    assert m["per_position"] == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert m["draft_acceptance_rate"] == pytest.approx(6 / 9)

    empty = acceptance_metrics([], 2)
    assert empty["num_drafts"] == 0 and math.isnan(empty["acceptance_length"])
    with pytest.raises(ValueError):
        acceptance_metrics([5], 4)
    with pytest.raises(ValueError):
        acceptance_metrics([1], 0)


def test_simulation_hand_made():
    # x = 10..17 (T = 8), prompt = x0 x1 (P = 2): first anchor a = 1 (bonus x2), depth d predicts x_{a+d+2}
    x = list(range(10, 18))
    table = torch.full((7, 3), 99)
    table[1] = torch.tensor([13, 14, 99])  # x3 x4 right, x5 wrong
    table[3] = torch.tensor([99, 16, 17])  # wrong at depth 0
    table[4] = torch.tensor([16, 17, 18])  # x6 x7 right; x8 is past the end
    runs = leading_matches(table, x)
    assert runs.tolist() == [0, 2, 0, 0, 2, 0, 0]
    # K=3: a=1 accepts 2 → a=4 accepts 2 (capped at the end) → a=7: a+2 > T−1, done
    assert simulate_rounds(runs, 2, 8, 3) == [2, 2]
    assert simulate_rounds(runs, 2, 8, 2) == [2, 2]
    # K=1 takes another path: a=1 → 1, a=3 → 0, a=4 → 1, a=6 is the last token: no round
    assert simulate_rounds(runs, 2, 8, 1) == [1, 0, 1]
    assert acceptance_metrics(simulate_rounds(runs, 2, 8, 1), 1)["acceptance_length"] == pytest.approx(5 / 3)
    # a generation of one token (T = P + 1) never drafts
    assert simulate_rounds([0], 2, 3, 4) == []


def test_load_prompts_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"prompt": \n')
    with pytest.raises(EvalError, match=r"p.jsonl:2"):
        load_prompts(bad)
    bad.write_text('{"question": "hi"}\n')
    with pytest.raises(EvalError, match=r"p.jsonl:1"):
        load_prompts(bad)
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, "x"]}\n')
    with pytest.raises(EvalError, match=r"p.jsonl:2: 'input_ids' must be a non-empty list of token ids"):
        load_prompts(bad)


def test_token_id_prompts(chat_tokenizer):
    ids = chat_tokenizer("hello there")["input_ids"]
    assert tokenize_prompts(chat_tokenizer, [{"input_ids": ids}]) == [ids]
    with pytest.raises(EvalError, match=r"prompt 0: 'input_ids' holds ids outside the tokenizer's vocabulary"):
        tokenize_prompts(chat_tokenizer, [{"input_ids": [len(chat_tokenizer)]}])


# ------------------------------------------------------------------------------------------------
# exactness


def test_prompts_continuations_and_states(cset, target, chat_tokenizer):
    tok = chat_tokenizer
    # chat record: the template with the generation prompt, the reference answer dropped
    text = tok.apply_chat_template(PROMPTS[1]["messages"][:1], add_generation_prompt=True, tokenize=False)
    assert cset.prompt_ids[1] == tok(text, add_special_tokens=False)["input_ids"]
    # plain prompt: one user message through the template; text: raw
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]["prompt"]}],
                                   add_generation_prompt=True, tokenize=False)
    assert cset.prompt_ids[0] == tok(text, add_special_tokens=False)["input_ids"]
    assert cset.prompt_ids[2] == tok(PROMPTS[2]["text"])["input_ids"]
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}
    for j in range(len(cset)):
        cont = cset.continuations[j]
        assert 1 <= len(cont) <= NEW_TOKENS
        assert not stops & set(cont[:-1])
        assert cset.stop_reasons[j] == ("eos" if cont[-1] in stops else "length")
        if cset.stop_reasons[j] == "length":
            assert len(cont) == NEW_TOKENS
        assert cset.aux[j].shape == (len(cset.sequence(j)), 3 * target.hidden_size)
        # aux states of the whole sequence equal the target's states of that sequence alone
        aux, _ = target.hidden_states(torch.tensor(cset.sequence(j)))
        torch.testing.assert_close(cset.aux[j], aux)


def test_one_pass_equals_dense_cod_forward(draft, cset):
    """Depth-0 stream once + chunked chains == one flat forward with the dense COD mask."""
    tables = draft_token_tables(draft, cset, K_MAX)
    with torch.no_grad():
        ids, docs, anchor, depth, h = _dense_forward(draft, cset, K_MAX, pad=K_MAX - 1)
        pred = draft.draft_to_target(draft.logits(h).argmax(-1))
    offset = 0
    checked = past_end = 0
    for j in range(len(cset)):
        table = tables[j]
        n = table.shape[0]
        p = len(cset.prompt_ids[j])
        for e in torch.nonzero(docs[anchor] == j).squeeze(1).tolist():
            a, d = int(anchor[e]) - offset, int(depth[e])
            if a >= n:  # a dummy element of the reference
                continue
            if p - 1 <= a <= n - 2:  # every anchor a round can visit, every depth (vLLM counts past the end)
                assert int(table[a, d]) == int(pred[e])
                checked += 1
                past_end += a + d > n - 2
            else:
                assert int(table[a, d]) == -1
        offset += n + K_MAX - 1
    assert checked > 20 and past_end >= len(cset) * (K_MAX - 1)
    # chunking (one anchor per chunk, one prompt per group) changes nothing
    small = draft_token_tables(draft, cset, K_MAX, max_positions=1, chunk_elements=1)
    assert all(torch.equal(a, b) for a, b in zip(tables, small, strict=True))


def test_one_pass_equals_literal_loop(draft, cset, target):
    tables = draft_token_tables(draft, cset, K_MAX)
    rounds = rounds_by_k(cset, tables, K_MAX)
    all_counts = []
    for k in (1, 2, 4):
        for j in range(len(cset)):
            budget = NEW_TOKENS
            counts, generated = literal_speculative_decode(target, draft, cset.prompt_ids[j], k, budget,
                                                           return_tokens=True)
            assert generated == cset.continuations[j], f"prompt {j}: literal loop generated other tokens"
            assert counts == rounds[j][k], f"prompt {j}, K={k}: literal {counts} != one-pass {rounds[j][k]}"
            if k == 4:
                all_counts += counts
        # the same numbers when the table is built for exactly this K
        direct = rounds_by_k(cset, draft_token_tables(draft, cset, k), k)
        assert [r[k] for r in direct] == [r[k] for r in rounds]
    assert any(m > 0 for m in all_counts), "trained draft never accepted anything: test is vacuous"
    assert any(m == 0 for m in all_counts) and sum(all_counts) < 4 * len(all_counts), "all accepted"


def test_acceptance_on_and_evaluate_agree(draft, cset, target, tmp_path):
    draft.train()
    res = acceptance_on(draft, cset, K_MAX)
    assert draft.training  # mode restored
    draft.eval()
    out = evaluate(target, draft, cset, out_dir=tmp_path / "plots", json_path=tmp_path / "eval.json",
                   progress=False, print_report=False)
    assert res["acceptance_length"] == out.overall["acceptance_length"]
    assert res["acceptance_length_by_k"] == out.acceptance_length
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data["acceptance_length"]) == {"1", "2", "3", "4"}
    assert len(data["per_position"]) == K_MAX
    assert data["num_drafts"] == sum(p["num_drafts"] for p in data["prompts"])
    assert data["num_drafts"] == out.num_drafts
    rates = data["per_position"]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))  # cumulative → non-increasing
    assert data["acceptance_length"]["4"] == pytest.approx(1 + sum(rates))
    flat = scalar_metrics(res, prefix="eval/")
    assert flat["eval/al"] == res["acceptance_length"] and flat["eval/al_k4"] == flat["eval/al"]
    assert [flat[f"eval/accept_pos{i}"] for i in (1, 2, 3, 4)] == res["per_position"]
    # save / load / head round trip
    cset.save(tmp_path / "cs.pt")
    back = ContinuationSet.load(tmp_path / "cs.pt")
    assert acceptance_on(draft, back, K_MAX) == res
    assert len(back.head(2)) == 2 and back.head(2).continuations == cset.continuations[:2]
    for name in ("acceptance_per_position.png", "al_vs_k.png", "al_histogram.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# d2t, context, plots, CLI


def test_d2t_mapping_applied(draft, cset, target):
    """A smaller draft vocab whose lm_head rows are the full draft's rows at ids S, with d2t = S − i,
    predicts exactly the same target ids; with the offsets dropped it predicts other ids."""
    full = draft_token_tables(draft, cset, K_MAX)
    used = torch.unique(torch.cat([t[t >= 0] for t in full]))
    v = target.vocab_size
    extra = torch.arange(0, v, 7)
    ids = torch.unique(torch.cat([used, extra]))
    ids = ids[ids < v]
    vd = ids.numel()
    assert vd < v
    small = _new_draft(target, draft_vocab_size=vd)
    state = {k: t for k, t in draft.state_dict().items() if k not in ("lm_head.weight", "d2t", "t2d")}
    small.load_state_dict(state, strict=False)
    with torch.no_grad():
        small.lm_head.weight.copy_(draft.lm_head.weight[ids])
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[ids] = True
    small.set_vocab_mapping(ids - torch.arange(vd), t2d)
    assert int(small.d2t.abs().sum()) > 0
    small.eval()
    mapped = draft_token_tables(small, cset, K_MAX)
    assert all(torch.equal(a, b) for a, b in zip(full, mapped, strict=True))
    assert acceptance_on(small, cset)["acceptance_length"] == acceptance_on(draft, cset)["acceptance_length"]
    with torch.no_grad():
        small.d2t.zero_()
    unmapped = draft_token_tables(small, cset, K_MAX)
    assert not all(torch.equal(a, b) for a, b in zip(full, unmapped, strict=True))


def test_prompt_longer_than_context_rejected(target):
    short_ctx = _new_draft(target, max_position_embeddings=12)
    with pytest.raises(EvalError, match=r"prompt 1 has \d+ tokens, longer than the context \(12"):
        evaluate(target, short_ctx, [{"prompt": "hi"}, {"prompt": "count from 3 to 9 " * 3}], 4,
                 progress=False, print_report=False)
    # a prompt that fits but whose budget does not: generation stops at the context
    cs = ContinuationSet.prepare(target, [{"prompt": "hi"}], 50, max_context=12, progress=False)
    assert len(cs.sequence(0)) <= 12
    assert cs.stop_reasons[0] in ("context", "eos")


def test_plot_helpers(tmp_path):
    from peagle.util import plots

    paths = [
        plots.plot_loss_curve([1, 2, 3], [3.0, 2.0, 1.5], tmp_path / "loss.png", val_steps=[3], val_losses=[1.7]),
        plots.plot_depth_accuracy([1, 2, 3], {0: [0.1, 0.5, 0.8], 1: [0.0, None, 0.4]}, tmp_path / "acc.png"),
        plots.plot_acceptance_bars([0.8, 0.5, float("nan")], tmp_path / "bars.png"),
        plots.plot_al_vs_k({1: 1.8, "2": 2.3}, tmp_path / "alk.png"),
        plots.plot_al_histogram([], tmp_path / "hist.png"),
        plots.plot_lines(tmp_path / "al.png", [10, 20], {"AL": [1.5, 2.0]}, ylabel="AL"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(draft, llama_dir, tmp_path, capsys):
    from peagle.store.checkpoint import TrainState, capture_rng, save_checkpoint

    # a run directory holding one complete training checkpoint: --draft resolves it as export does
    ckpt = tmp_path / "run"
    save_checkpoint(ckpt, TrainState(step=1), model=draft, optimizer=torch.optim.AdamW(draft.parameters()),
                    rng_states=[capture_rng()], config={})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]))
    rc = cli_main(["--target", str(llama_dir), "--draft", str(ckpt), "--prompts", str(prompts),
                   "--max-new-tokens", "8", "--num-speculative-tokens", "2", "--out", str(tmp_path / "o"),
                   "--device", "cpu", "--no-progress", "--check-exact"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean AL" in text and "2/2 prompts agree exactly" in text
    data = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert set(data["acceptance_length"]) == {"1", "2"} and len(data["prompts"]) == 2
    rc = cli_main(["--target", str(llama_dir), "--draft", str(tmp_path), "--prompts", str(prompts),
                   "--device", "cpu", "--no-progress"])
    assert rc == 1
    assert "is neither a training checkpoint, a run output directory nor an exported draft" in capsys.readouterr().err


def test_lookahead_is_the_targets_greedy_past_the_end(cset, target):
    """lookahead[j] = the target's next K−1 greedy tokens after the output, even after a stop token
    (what vLLM's verifier compares the last round's drafts with), computed here without a KV cache."""
    def greedy_after(tokens, n):
        out = []
        for _ in range(n):
            with torch.no_grad():
                out.append(int(target.model(input_ids=torch.tensor([tokens + out])).logits[0, -1].argmax()))
        return out

    assert all(r == "length" for r in cset.stop_reasons)  # the random target never says <|end|> here
    for j in range(len(cset)):
        assert cset.lookahead[j] == greedy_after(cset.sequence(j), K_MAX - 1)
    # a stop id that occurs mid-continuation: the output ends there, the lookahead goes on past it
    cont = cset.continuations[0]
    stop = cont[2]
    gen = greedy_generate(target.model, [cset.prompt_ids[0], cset.prompt_ids[1]], [NEW_TOKENS] * 2, [stop], 0,
                          lookahead=K_MAX - 1)[0]
    assert gen.stop_reason == "eos" and gen.tokens == cont[: cont.index(stop) + 1]
    assert gen.lookahead == greedy_after(cset.prompt_ids[0] + gen.tokens, K_MAX - 1)


def test_vllm_counts_and_useful_counts(draft, cset):
    """Default rounds count drafts accepted past the end; useful rounds stop there; same rounds either way."""
    tables = draft_token_tables(draft, cset, K_MAX)
    served = rounds_by_k(cset, tables, K_MAX)
    useful = rounds_by_k(cset, tables, K_MAX, useful=True)
    for j in range(len(cset)):
        t = len(cset.sequence(j))
        for k in range(1, K_MAX + 1):
            assert len(served[j][k]) == len(useful[j][k])
            a = len(cset.prompt_ids[j]) - 1
            for mv, mu in zip(served[j][k], useful[j][k], strict=True):
                assert mu == min(mv, t - a - 2)  # the same round, capped at the tokens left in the output
                a += mv + 1
    with pytest.raises(EvalError, match="lookahead"):
        rounds_by_k(cset.head(1).__class__(**{**cset.head(1).__dict__, "lookahead": [[]]}), tables[:1], K_MAX)


def test_cli_uses_the_drafts_own_aux_layers(target, llama_dir, tmp_path):
    """A draft trained on non-default aux layers (listed out of order) is evaluated on exactly those layers,
    in increasing order: the JSON equals an evaluation on a Target built with the sorted ids."""
    ids = [4, 0, 1]
    d = _new_draft(target, seed=3, aux_layer_ids=ids)
    assert d.config.aux_layer_ids == [0, 1, 4]
    d.save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    assert cli_main(["--target", str(llama_dir), "--draft", str(tmp_path / "draft"), "--prompts", str(prompts),
                     "--max-new-tokens", "8", "--json", str(tmp_path / "e.json"), "--device", "cpu",
                     "--no-progress"]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    want = evaluate(Target(llama_dir, device="cpu", aux_layer_ids=(0, 1, 4)), d, str(prompts), 8, progress=False,
                    print_report=False)
    assert got["acceptance_length"] == {str(k): v for k, v in want.acceptance_length.items()}
    assert [p["accepted_per_round"] for p in got["prompts"]] == [p["accepted_per_round"] for p in want.prompts]


def test_eval_refuses_a_target_the_draft_was_not_trained_for(target, llama_dir, qwen3_dir, tmp_path):
    """The draft records its target's fingerprint; another fine-tune of the same shape (final norm changed),
    or another model, is refused by name unless --allow-other-target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peagle.eval import check_verifier
    from peagle.target.hf import verifier_fingerprint

    tok = AutoTokenizer.from_pretrained(llama_dir)
    d = _new_draft(target, seed=4, verifier_fingerprint=verifier_fingerprint(target, tok))
    check_verifier(d, target)  # its own target
    back = DraftConfig.from_speculators_config(d.config.to_speculators_config())
    assert back.verifier_fingerprint == d.config.verifier_fingerprint
    tuned = tmp_path / "tuned"
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    with pytest.raises(EvalError, match=r"another target than .*tuned \(final_norm_sha256"):
        evaluate(Target(tuned, device="cpu"), d, PROMPTS, 4, progress=False, print_report=False)
    res = evaluate(Target(tuned, device="cpu"), d, PROMPTS, 4, progress=False, print_report=False,
                   allow_other_target=True)
    assert res.num_drafts > 0
    with pytest.raises(EvalError, match="num_hidden_layers 6 vs 8"):
        check_verifier(d, Target(qwen3_dir, device="cpu"))
