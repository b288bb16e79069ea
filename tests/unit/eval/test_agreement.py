"""Why vLLM differs from the prediction (`peagle.eval.agreement`): hand-built rounds and outputs, the
rounds a differing token cannot reach, near-ties, the summary, and `peagle eval --engine vllm`'s exit
status and report with a fake engine standing in for vLLM (tests_vllm/ serves the real one)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from peagle.cli import main
from peagle.eval.agreement import (
    NEAR_TIE,
    classify_prompt,
    first_difference,
    judge,
    lookahead_positions,
    margins,
    near_tie_threshold,
    rounds_before,
    summarise_agreement,
    top2_margin,
)
from peagle.eval.rounds import leading_matches, simulate_rounds

# ------------------------------------------------------------------------------------------------
# pure functions


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 7]) == 2
    assert first_difference([], []) is None


def test_rounds_before_hand_made():
    # K' = 2. Round 1 (anchor −1) checks indices 1, 2, accepts 2 -> reads up to 2; round 2 (anchor 2) checks
    # 4, 5, accepts 0 -> reads 4; round 3 (anchor 3) checks 5, 6, accepts 1 -> reads 6.
    rounds = [2, 0, 1]
    assert [rounds_before(rounds, 2, p) for p in range(8)] == [0, 0, 0, 1, 1, 2, 2, 3]
    assert rounds_before(rounds, 2, None) == 3
    # the first generated token (index 0, sampled at prefill) and index 1 are read by the first round already
    assert rounds_before([0, 0], 1, 1) == 0
    assert rounds_before([0, 0], 1, 2) == 1


def test_equal_is_none():
    assert classify_prompt(0, [5, 6, 7, 8], [1, 0], [5, 6, 7, 8], [1, 0], 2) is None


def test_same_output_other_rounds_is_a_draft_disagreement():
    row = classify_prompt(3, [5, 6, 7, 8, 9, 4], [2, 1], [5, 6, 7, 8, 9, 4], [1, 1, 0], 2)
    assert row["kind"] == "draft" and row["round"] == 0 and row["position"] is None
    assert (row["offline_drafts"], row["offline_accepted"], row["vllm_drafts"], row["vllm_accepted"]) == (2, 3, 3, 2)
    # one more round on one side only
    row = classify_prompt(0, [5, 6, 7], [0], [5, 6, 7], [0, 0], 1)
    assert row["kind"] == "draft" and row["round"] == 1


def test_output_difference_after_the_rounds_that_agree():
    # K' = 2, offline rounds [2, 0, 1]: the output differs at index 5 -> only rounds 1 and 2 (reading ≤ 4)
    # must agree; vLLM's rounds past them are counted on another text
    off = [10, 11, 12, 13, 14, 15, 16, 17]
    vl = [10, 11, 12, 13, 14, 99, 98, 97]
    row = classify_prompt(1, off, [2, 0, 1, 2], vl, [2, 0, 0, 0, 2], 2)
    assert row["kind"] == "output" and row["position"] == 5 and row["round"] is None
    assert (row["offline_token"], row["vllm_token"]) == (15, 99)
    # a round before the difference that disagrees is the draft's
    row = classify_prompt(1, off, [2, 0, 1, 2], vl, [1, 1, 0, 1], 2)
    assert row["kind"] == "draft" and row["round"] == 0 and row["position"] == 5


def _rounds(table: torch.Tensor, prompt: list[int], cont: list[int], k: int) -> list[int]:
    seq = prompt + cont
    return simulate_rounds(leading_matches(table, seq), len(prompt), len(seq), k)


@pytest.mark.parametrize("seed", range(40))
def test_a_differing_token_never_reads_as_a_draft_disagreement(seed):
    """Simulated: two engines agree up to index `pos`, then differ; the draft at anchor a reads tokens up to
    a + 1, so its table is the same on both for anchors a + 1 < P + pos and anything after. The rounds the
    classification compares must then agree (never "draft"); changing a draft token the offline path
    accepted at an early anchor is a draft disagreement."""
    rng = random.Random(seed)
    k = rng.randint(1, 4)
    vocab = 3  # small: long accepted runs and frequent rejections
    p_len, t = 3, rng.randint(4, 24)
    prompt = [rng.randrange(vocab) for _ in range(p_len)]
    off = [rng.randrange(vocab) for _ in range(t)]
    pos = rng.randrange(t)
    vl = off[:pos] + [(off[pos] + 1) % vocab] + [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
    n = p_len + max(t, len(vl))
    table_off = torch.randint(0, vocab, (n, k))
    for a in range(n):  # make the draft right often: copy the truth of the offline sequence
        for d in range(k):
            if a + d + 2 < p_len + t and rng.random() < 0.7:
                table_off[a, d] = (prompt + off)[a + d + 2]
    table_vl = table_off.clone()
    for a in range(n):
        if a + 1 >= p_len + pos:  # the draft's context differs from here on
            table_vl[a] = torch.randint(0, vocab, (k,))
    r_off, r_vl = _rounds(table_off, prompt, off, k), _rounds(table_vl, prompt, vl, k)
    row = classify_prompt(0, off, r_off, vl, r_vl, k)
    assert row is not None and row["kind"] == "output" and row["position"] == pos
    # the same output, a draft token changed at the first anchor the offline path accepted a token at
    safe = rounds_before(r_off, k, pos)
    anchor = p_len - 1
    for i in range(safe):
        if r_off[i] > 0:
            bad = table_vl.clone()
            bad[anchor, 0] = (bad[anchor, 0] + 1) % vocab
            row = classify_prompt(0, off, r_off, vl, _rounds(bad, prompt, vl, k), k)
            assert row["kind"] == "draft" and row["round"] == i
            break
        anchor += r_off[i] + 1


def test_lookahead_positions():
    # K' = 3, rounds [1, 3]: round 2's anchor is 1, it checks indices 3, 4, 5; with an output of 4 tokens it
    # reads 4 and 5 past the end
    assert lookahead_positions([1, 3], 3, 1, 4) == [4, 5]
    assert lookahead_positions([1, 3], 3, 0, 4) == []
    row = classify_prompt(0, [1, 2, 3, 4], [1, 3], [1, 2, 3, 4], [1, 2], 3)
    assert row["kind"] == "draft" and row["round"] == 1 and row["lookahead"] == [4, 5]


def test_judge_and_near_ties():
    out = {"kind": "output"}
    assert judge({**out, "hf_margin": 0.01, "vllm_margin": 0.02}, 0.05)["near_tie"] is True
    assert judge({**out, "hf_margin": 0.01, "vllm_margin": 0.2}, 0.05)["near_tie"] is False
    assert judge({**out, "hf_margin": 0.3, "vllm_margin": 0.01}, 0.05)["near_tie"] is False
    assert judge({**out, "hf_margin": 0.01, "vllm_margin": None}, 0.05)["near_tie"] is False  # unknown: not a tie
    assert judge({**out, "hf_margin": 0.05, "vllm_margin": 0.05}, 0.05)["near_tie"] is True  # at most
    row = judge({"kind": "draft", "lookahead": [4, 5], "hf_lookahead_margin": 0.001}, 0.05)
    assert row["kind"] == "lookahead" and row["near_tie"] is True
    row = judge({"kind": "draft", "lookahead": [4, 5], "hf_lookahead_margin": 2.0}, 0.05)
    assert row["kind"] == "draft" and row["near_tie"] is False
    assert judge({"kind": "draft"}, 1e9)["near_tie"] is False  # a draft disagreement is never a tie


def test_margins_between_the_two_choices():
    # the usual case: each engine's runner-up is the other's choice -> the top-2 margins
    m = margins({5: 2.0, 9: 1.99}, {9: -0.5, 5: -0.52}, 5, 9)
    assert m["hf_margin"] == pytest.approx(0.01) and m["vllm_margin"] == pytest.approx(0.02)
    assert m["hf_top2_margin"] == pytest.approx(0.01) and m["vllm_top2_margin"] == pytest.approx(0.02)
    # vLLM's token is HF's third: HF's whole logit vector gives the pair's margin, not the (tiny) top-2 one
    logits = {5: 2.0, 7: 1.999, 9: -3.0}
    m = margins({5: 2.0, 7: 1.999}, {9: -0.5, 5: -0.52}, 5, 9, hf_logit=logits.__getitem__)
    assert m["hf_margin"] == pytest.approx(5.0) and m["hf_top2_margin"] == pytest.approx(0.001)
    assert judge({"kind": "output", **m}, 0.05)["near_tie"] is False
    # HF's token is not in vLLM's top-2: unknown on vLLM's side, never a near-tie
    m = margins({5: 2.0, 9: 1.99}, {9: -0.5, 7: -0.51}, 5, 9)
    assert m["vllm_margin"] is None and m["vllm_top2_margin"] == pytest.approx(0.01)
    assert judge({"kind": "output", **m}, 0.05)["near_tie"] is False
    # the measured HF margin may have either sign (its batched greedy run ranked the pair the other way)
    assert judge({"kind": "output", "hf_margin": -0.01, "vllm_margin": 0.01}, 0.05)["near_tie"] is True


def test_top2_margin_and_thresholds():
    assert top2_margin({3: -0.5, 7: -0.75}) == pytest.approx(0.25)
    assert top2_margin({3: 1.0, 7: 4.0, 9: 3.5}) == pytest.approx(0.5)
    assert top2_margin({3: -0.1}) is None and top2_margin(None) is None
    assert near_tie_threshold("fp32") == NEAR_TIE["fp32"] < near_tie_threshold("bf16") == NEAR_TIE["bf16"]
    assert near_tie_threshold("bf16", 0.0) == 0.0
    with pytest.raises(ValueError, match="near-tie"):
        near_tie_threshold("fp32", -1.0)
    with pytest.raises(ValueError, match="near-tie"):
        near_tie_threshold("fp32", float("nan"))


def test_summary_counts_outputs_apart_from_drafts():
    tie = {"index": 0, "kind": "output", "near_tie": True}
    far = {"index": 1, "kind": "output", "near_tie": False}
    draft = {"index": 2, "kind": "draft", "near_tie": False}
    look = {"index": 3, "kind": "lookahead", "near_tie": True}
    s = summarise_agreement({1: [tie], 2: [tie, look]}, 0.05)
    assert s["ok"] is True and s["prompts_outputs_differ"] == [0, 3] and s["prompts_draft_disagrees"] == []
    assert s["by_k"]["2"] == {"outputs_differ": 2, "near_ties": 2, "not_near_ties": 0, "draft_disagreements": 0}
    s = summarise_agreement({1: [tie, draft], 2: [far]}, 0.05)
    assert s["ok"] is False and s["prompts_draft_disagrees"] == [2] and s["prompts_not_near_tie"] == [1]
    assert s["by_k"]["1"]["draft_disagreements"] == 1 and s["by_k"]["2"]["not_near_ties"] == 1
    assert summarise_agreement({1: [], 2: []}, 0.05)["ok"] is True


# ------------------------------------------------------------------------------------------------
# compare_with_vllm and `peagle eval --engine vllm` with a fake engine in vLLM's place

K = 2
NEW = 10
PROMPTS = [{"prompt": "count from 3 to 9"}, {"prompt": "sort these words: pear, apple, fig"},
           {"text": "The word apple has"}]


def _fake_engine(target_dir, perturb):
    """`served_counters` as a faultless engine would answer (HF greedy outputs, the offline rounds, HF's
    top-2 log-probabilities at every position), then `perturb(k, outputs, rounds, logprobs)` edits it."""
    from peagle.eval import ContinuationSet, draft_token_tables
    from peagle.eval.rounds import per_position_counts, rounds_by_k
    from peagle.model.draft import PEagleDraft
    from peagle.target.hf import Target

    def served_counters(target, draft, prompt_ids, budgets, stop_ids, k_values, *, max_model_len, dtype,
                        logprobs=None, engine_args=None):
        d = PEagleDraft.from_pretrained(draft)
        t = Target(target, device="cpu", aux_layer_ids=d.config.aux_layer_ids)
        kmax = max(k_values)
        cs = ContinuationSet.prepare(t, [{"input_ids": list(p)} for p in prompt_ids], max(budgets),
                                     lookahead=kmax - 1, progress=False)
        rounds = rounds_by_k(cs, draft_token_tables(d, cs, kmax, progress=False), kmax)
        top = []
        with torch.no_grad():
            for j in range(len(cs)):
                lp = t.model(input_ids=torch.tensor([cs.sequence(j)])).logits[0].float().log_softmax(-1)
                p = len(cs.prompt_ids[j])
                rows = []
                for c in range(len(cs.continuations[j])):
                    v, i = lp[p + c - 1].topk(2)
                    rows.append({int(a): float(b) for a, b in zip(i.tolist(), v.tolist(), strict=True)})
                top.append(rows)
        out = {}
        for kk in k_values:
            outputs = [list(c) for c in cs.continuations]
            rr = [list(r[kk]) for r in rounds]
            lps = [[dict(x) for x in row] for row in top]
            perturb(kk, outputs, rr, lps)
            flat = [m for r in rr for m in r]
            out[kk] = {"num_drafts": len(flat), "num_draft_tokens": kk * len(flat), "num_accepted_tokens": sum(flat),
                       "accepted_per_position": per_position_counts(flat, kk),
                       "acceptance_length": 1 + sum(flat) / len(flat), "outputs": outputs, "rounds": rr,
                       "logprobs": lps}
        return out

    return served_counters


@pytest.fixture
def served(llama_dir, tmp_path, monkeypatch):
    """A random draft of the tiny Llama saved as an export, prompts, a fake engine installer and the CLI."""
    from transformers import AutoConfig

    import peagle.target.vllm_engine as engine
    from peagle.model.config import DraftConfig
    from peagle.model.draft import PEagleDraft

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(llama_dir)
    draft = PEagleDraft(DraftConfig.from_target(cfg, mask_token_id=cfg.vocab_size - 1, num_hidden_layers=1,
                                                intermediate_size=64, num_speculative_tokens=K,
                                                verifier_name_or_path=str(llama_dir)))
    draft.save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    monkeypatch.setattr(engine, "eagle3_support_problem", lambda architectures: None)

    def install(perturb=lambda *a: None):
        monkeypatch.setattr(engine, "served_counters", _fake_engine(llama_dir, perturb))

    def run(*extra):
        js = tmp_path / "eval.json"
        rc = main(["eval", "--target", str(llama_dir), "--draft", str(tmp_path / "draft"), "--prompts", str(prompts),
                   "--max-new-tokens", str(NEW), "--device", "cpu", "--no-progress", "--engine", "vllm",
                   "--json", str(js), *extra])
        return rc, json.loads(js.read_text())["vllm"] if js.exists() else None

    return install, run


def _flip(pos):
    """Prompt 0's output takes HF's second token at `pos` (its top-2 swapped, a 0.01 margin in vLLM) and goes
    on elsewhere; its rounds after the ones that cannot see `pos` are cut to one empty round."""
    def perturb(kk, outputs, rounds, logprobs):
        top = logprobs[0][pos]
        (first, a), (second, b) = sorted(top.items(), key=lambda tv: -tv[1])
        logprobs[0][pos] = {second: a, first: a - 0.01}
        outputs[0][pos:] = [second] + [first] * 3
        rounds[0][rounds_before(rounds[0], kk, pos):] = [0]
    return perturb


def test_engine_agrees_exit_0(served, capsys):
    install, run = served
    install()
    rc, v = run()
    assert rc == 0 and v["ok"] is True and v["agrees"] is True and v["differences"] == {}
    assert v["prompts_outputs_differ"] == [] and v["near_tie_threshold"] == NEAR_TIE["fp32"]
    assert v["by_k"][str(K)]["draft_disagreements"] == 0 and v["dtype"] == "fp32"
    assert "0/3 prompts whose outputs differ" in capsys.readouterr().out


def test_output_difference_at_a_near_tie_exits_0_and_says_where(served, capsys):
    install, run = served
    install(_flip(3))
    rc, v = run("--near-tie", "1000")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert v["ok"] is True and v["agrees"] is False  # the counters differ; the verdict explains why
    assert v["prompts_outputs_differ"] == [0] and v["prompts_draft_disagrees"] == []
    for kk in ("1", "2"):
        (row,) = v["differences"][kk]
        assert row["kind"] == "output" and row["position"] == 3 and row["near_tie"] is True
        assert row["vllm_margin"] == pytest.approx(0.01, abs=1e-6)
        hf = dict((int(t), x) for t, x in row["hf_top2"])
        assert row["offline_token"] in hf and row["vllm_token"] in hf  # HF's own top-2 at that position
        assert row["hf_margin"] == pytest.approx(hf[row["offline_token"]] - hf[row["vllm_token"]], abs=1e-5)
        assert row["hf_top2_margin"] == pytest.approx(abs(row["hf_margin"]), abs=1e-5)
        assert v["by_k"][kk]["outputs_differ"] == 1 and v["by_k"][kk]["near_ties"] == 1
    assert "#0 output differs at token 3" in out and "near-tie" in out and "-> OK" in out


def test_output_difference_that_is_not_a_near_tie_exits_4(served, capsys):
    install, run = served
    install(_flip(3))
    rc, v = run("--near-tie", "0")
    assert rc == 4 and v["ok"] is False and v["prompts_not_near_tie"] == [0]
    assert "NOT a near-tie" in capsys.readouterr().out


def test_draft_disagreement_exits_4(served, capsys):
    install, run = served

    def perturb(kk, outputs, rounds, logprobs):
        first = rounds[1][0]
        rounds[1][0] = first - 1 if first > 0 else 1  # same output, the first round accepted another count

    install(perturb)
    rc, v = run("--near-tie", "1000")
    assert rc == 4 and v["ok"] is False and v["prompts_draft_disagrees"] == [1] and v["prompts_outputs_differ"] == []
    row = v["differences"][str(K)][0]
    assert row["kind"] == "draft" and row["round"] == 0 and row["position"] is None
    assert "#1 DRAFT DISAGREES at round 0" in capsys.readouterr().out


def test_near_tie_flag_is_checked(served, capsys):
    _, run = served
    rc, _ = run("--near-tie", "-1")
    assert rc == 1 and "--near-tie" in capsys.readouterr().err
