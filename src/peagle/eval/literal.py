"""The literal speculative-decoding loop: the proof that the one-pass tables are vLLM's rounds.

`literal_speculative_decode` rebuilds each round from scratch exactly as vLLM's parallel drafting
does (real slots, the bonus slot, K − 1 mask slots from `PEagleDraft.mask_slots`, plain causal
attention, verification by the target's greedy tokens), with no COD table and no shared forward.
The tests, and `peagle eval --check-exact` (`check_exact`), compare its accepted count per round
with the one-pass simulation's (docs/evaluation.md).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from peagle.eval.continuations import context_length
from peagle.eval.prompts import load_prompts, load_tokenizer, stop_token_ids, tokenize_prompts
from peagle.eval.tables import argmax_target_ids, shift_sequence
from peagle.model.draft import PEagleDraft

__all__ = ["check_exact", "literal_speculative_decode"]


def _causal_attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


@torch.no_grad()
def literal_speculative_decode(
    target: Any,
    draft: PEagleDraft,
    prompt_ids: Sequence[int],
    k: int,
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] | None = None,
    return_tokens: bool = False,
    useful: bool = False,
) -> list[int] | tuple[list[int], list[int]]:
    """Greedy speculative decoding, built round by round exactly as vLLM's parallel drafting does.

    Each round recomputes from scratch (no KV cache): the target's aux states over the verified
    context; the draft input = real slots (x_{j+1}, g_j) at position j, the bonus slot (x_{a+1}, g_a)
    at position a, K−1 mask slots (mask token, projected mask_hidden) at positions a+1..a+K−1;
    PLAIN causal attention; the K argmax tokens (mapped through d2t); verification against the
    target's greedy tokens over context + drafts; accept the longest agreeing prefix, append it and
    the target's bonus token. Stops at a stop token or after `max_new_tokens` new tokens. Returns the
    accepted count per round as vLLM counts it (every draft the verifier accepts, also past the stop
    point; ``useful=True``: only those inside the output), and the generated tokens with `return_tokens`.
    """
    if k < 1 or max_new_tokens < 1:
        raise ValueError("K and max_new_tokens must be >= 1")
    was_training = draft.training
    draft.eval()
    stop = set(stop_ids if stop_ids is not None else stop_token_ids(target, load_tokenizer(target)))
    device = draft.fc.weight.device
    dtype = draft.fc.weight.dtype
    model = target.model

    def greedy(tokens: list[int]) -> list[int]:
        ids = torch.tensor([tokens], dtype=torch.long, device=target.device)
        return model(input_ids=ids, use_cache=False).logits[0].argmax(dim=-1).tolist()

    try:
        tokens = list(prompt_ids)
        generated = [greedy(tokens)[-1]]  # prefill
        tokens.append(generated[0])
        counts: list[int] = []
        done = generated[0] in stop or len(generated) >= max_new_tokens
        while not done:
            a = len(tokens) - 2  # the bonus token x_{a+1} is the last token
            aux, _ = target.hidden_states(torch.tensor(tokens, dtype=torch.long))
            real_ids, real_aux = shift_sequence(tokens, aux)  # real slots 0..a-1 and the bonus slot a
            mask_ids, mask_rows = draft.mask_slots(k - 1, dtype)
            ids = torch.cat([real_ids.to(device), mask_ids])
            hidden = torch.cat([draft.project_aux(real_aux.to(device=device, dtype=dtype)), mask_rows])
            pos = torch.arange(a + k, device=device)
            h = draft(ids, hidden, pos, _causal_attention)
            drafts = argmax_target_ids(draft, h[a:a + k]).tolist()
            verify = greedy(tokens + drafts)  # verify[t] = target's token after position t
            m = 0
            while m < k and drafts[m] == verify[a + 1 + m]:
                m += 1
            new = drafts[:m] + [verify[a + 1 + m]]
            appended = 0
            for t in new:
                tokens.append(t)
                generated.append(t)
                appended += 1
                if t in stop or len(generated) >= max_new_tokens:
                    done = True
                    break
            counts.append(min(m, appended) if useful else m)
    finally:
        draft.train(was_training)
    return (counts, generated) if return_tokens else counts


def check_exact(
    target: Any,
    draft: PEagleDraft,
    prompts: str | Path,
    prompt_rows: Sequence[Mapping[str, Any]],
    k: int,
    max_new_tokens: int,
    *,
    chat_template: str | None = None,
    progress: bool = True,
) -> int:
    """Run the literal loop on every evaluated prompt; the number of prompts whose rounds differ.

    prompt_rows: `EvalResult.prompts` of the one-pass evaluation of `prompts` (its "index" and
    "accepted_per_round"); same budgets (max_new_tokens, cut at the context) and stop ids. Each
    disagreement is printed on stderr, the summary line on stdout.
    """
    tokenizer = load_tokenizer(target)
    from peagle.data.templates import load_chat_template

    ids = tokenize_prompts(tokenizer, load_prompts(prompts), load_chat_template(chat_template))
    stops = stop_token_ids(target, tokenizer)
    ctx = context_length(target, draft)
    bad = 0
    for p in tqdm(prompt_rows, desc="literal loop", disable=not progress):
        i = p["index"]
        budget = min(max_new_tokens, ctx - len(ids[i]))
        counts = literal_speculative_decode(target, draft, ids[i], k, budget, stop_ids=stops)
        if counts != p["accepted_per_round"]:
            bad += 1
            print(f"prompt {i}: literal loop {counts} != one-pass {p['accepted_per_round']}", file=sys.stderr)
    print(f"literal loop check: {len(prompt_rows) - bad}/{len(prompt_rows)} prompts agree exactly")
    return bad
