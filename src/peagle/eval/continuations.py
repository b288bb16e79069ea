"""The target side of an evaluation, prepared once: greedy continuations and their aux states.

`ContinuationSet.prepare` tokenizes the prompts, generates the target's greedy continuation of each
(HF generate, KV cache; stop ids and per-prompt budgets as vLLM applies them, cut at the context)
plus `lookahead` tokens past each end (what vLLM's verifier compares the last round's drafts with,
docs/evaluation.md), and captures the target's aux states over prompt + continuation. Scoring a draft
on the set needs no target again (`peagle.eval.tables.acceptance_on`, the training loop's hook).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from peagle.eval.errors import EvalError
from peagle.eval.prompts import load_prompts, load_tokenizer, stop_token_ids, tokenize_prompts
from peagle.model.draft import PEagleDraft

__all__ = ["ContinuationSet", "Generation", "context_length", "greedy_generate"]


def context_length(target: Any, draft: PEagleDraft | None) -> int:
    """The positions a request may use: the smaller of the target's and the draft's max_position_embeddings."""
    ctx = int(getattr(target.config, "max_position_embeddings", 0) or 1 << 30)
    if draft is not None:
        ctx = min(ctx, int(draft.config.max_position_embeddings))
    return ctx


class Generation(NamedTuple):
    """One greedy continuation: its tokens (up to and including the first stop id), why it ended
    ("eos" | "length") and the target's next greedy tokens past that end (`lookahead`, stop ids ignored)."""

    tokens: list[int]
    stop_reason: str
    lookahead: list[int]


class _StopAfterLookahead(StoppingCriteria):
    """Per row: done once `lookahead` tokens follow the first stop id (or budget + lookahead tokens)."""

    def __init__(self, width: int, budget: int, lookahead: int, stop_ids: Sequence[int]):
        self.width, self.budget, self.lookahead = width, budget, lookahead
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        new = input_ids[:, self.width:]
        n = new.shape[1]
        hit = torch.isin(new, self.stop.to(new.device))
        first = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), torch.full_like(new[:, 0], self.budget - 1))
        end = torch.minimum(first, torch.full_like(first, self.budget - 1))
        return (n >= end + 1 + self.lookahead) | (n >= self.budget + self.lookahead)


@torch.no_grad()
def greedy_generate(
    model: Any, prompt_ids: Sequence[Sequence[int]], budgets: Sequence[int], stop_ids: Sequence[int], pad_id: int,
    batch_size: int = 8, progress: bool = False, lookahead: int = 0, temperature: float = 0.0, top_p: float = 1.0,
    length_hints: Sequence[int] | None = None,
) -> list[Generation]:
    """Greedy continuations of token-id prompts with HF generate (KV cache, left-padded batches);
    sampled (temperature, top_p) when temperature > 0.

    Prompts of equal budget (max new tokens) are batched, shortest first (least padding); with
    `length_hints` (an expected length of each continuation) by hint first: a batch decodes until its
    longest row ends, so rows of like length waste the fewest steps. Returns a
    `Generation` per prompt, in input order. With `lookahead` = n, generation goes on n tokens past each
    continuation's end, ignoring stop ids: the target's tokens that vLLM's verifier compares the last
    round's drafts with (docs/evaluation.md, "What vLLM counts").
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    hints = length_hints if length_hints is not None else [0] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: (budgets[i], hints[i], len(prompt_ids[i])))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and budgets[batches[-1][0]] == budgets[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    stop = set(stop_ids)
    out: list[Generation] = [Generation([], "", [])] * len(prompt_ids)
    device = model.device
    # With a lookahead no stop id may end generate(): an id outside the vocabulary never comes out of argmax
    # (None would be replaced by the model's own generation_config eos ids).
    never = [int(model.get_output_embeddings().weight.shape[0])]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        width = max(len(prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            p = prompt_ids[i]
            ids[r, width - len(p):] = torch.tensor(p)
            att[r, width - len(p):] = 1
        budget = budgets[batch[0]]
        criteria = None
        if lookahead:
            criteria = StoppingCriteriaList([_StopAfterLookahead(width, budget, lookahead, stop_ids)])
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        cfg = GenerationConfig(
            **({"do_sample": False} | sample), num_beams=1, max_new_tokens=budget + lookahead,
            eos_token_id=never if lookahead else (list(stop_ids) or None), pad_token_id=pad_id,
        )
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=cfg,
                             stopping_criteria=criteria)
        new = gen[:, width:].tolist()
        for r, i in enumerate(batch):
            cont, reason = [], "length"
            for t in new[r][:budget]:
                cont.append(int(t))
                if t in stop:
                    reason = "eos"
                    break
            out[i] = Generation(cont, reason, [int(t) for t in new[r][len(cont):len(cont) + lookahead]])
    return out


@torch.no_grad()
def _aux_states(target: Any, sequences: list[list[int]], max_tokens: int, progress: bool) -> list[Tensor]:
    """Target aux states [T, 3Ht] of every sequence (rows padded to the longest, −1 documents)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * len(sequences[i]) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    out: list[Tensor] = [torch.empty(0)] * len(sequences)
    for batch in tqdm(batches, desc="target states", unit="batch", disable=not progress):
        width = max(len(sequences[i]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        docs = torch.full((len(batch), width), -1, dtype=torch.long)
        for r, i in enumerate(batch):
            s = sequences[i]
            ids[r, : len(s)] = torch.tensor(s)
            docs[r, : len(s)] = r
        aux, _ = target.hidden_states(ids, docs)
        for r, i in enumerate(batch):
            out[i] = aux[r, : len(sequences[i])].detach().cpu()
    return out


@dataclass
class ContinuationSet:
    """Prompts, the target's greedy continuations and the target aux states, prepared once.

    Scoring a draft on it (`acceptance_on`) needs no target: this is what the training loop keeps
    for its `eval_every` evaluations. aux[j] is [T_j, 3·Ht] (the state at every position of prompt
    + continuation, in the target's dtype, on CPU). stop_reasons: "eos", "length" (token budget)
    or "context" (the budget was cut so the sequence fits the context window). lookahead[j]: the
    target's greedy tokens past the end of continuation j (stop ids ignored; none after "context"),
    which vLLM's counters compare the last round's drafts with.
    """

    prompt_ids: list[list[int]]
    continuations: list[list[int]]
    stop_reasons: list[str]
    aux: list[Tensor]
    aux_layer_ids: tuple[int, ...]
    max_new_tokens: int
    completions: list[str] = field(default_factory=list)
    lookahead: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def sequence(self, j: int) -> list[int]:
        """Prompt + continuation tokens of prompt j."""
        return self.prompt_ids[j] + self.continuations[j]

    @classmethod
    def prepare(
        cls,
        target: Any,
        prompts: str | Path | Sequence[Any],
        max_new_tokens: int,
        *,
        tokenizer: Any = None,
        chat_template: str | None = None,
        max_context: int | None = None,
        batch_size: int = 8,
        aux_batch_tokens: int = 16384,
        limit: int | None = None,
        lookahead: int = 0,
        progress: bool = True,
    ) -> ContinuationSet:
        """Tokenize prompts, generate greedy continuations, and capture target aux states.

        prompts: a JSONL/JSON file or a list of records (see `tokenize_prompts`). A prompt that
        leaves no room in the context (target's max_position_embeddings, or `max_context`) for one
        new token is an error naming its index; a prompt whose budget would run past the context
        generates only up to it (stop reason "context", as vLLM's max_model_len does). `limit`:
        use only the first `limit` prompts (nothing is generated for the others). `lookahead`: how
        many target tokens past each end to keep; vLLM's counters at K need K − 1.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EvalError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(target)
        if chat_template is not None:
            from peagle.data.templates import load_chat_template

            chat_template = load_chat_template(chat_template)
        records = load_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        if limit is not None:
            records = records[:limit]
        if not records:
            raise EvalError("no prompts to evaluate")
        prompt_ids = tokenize_prompts(tokenizer, records, chat_template)
        ctx = max_context if max_context is not None else context_length(target, None)
        budgets, reasons_ctx = [], []
        for i, p in enumerate(prompt_ids):
            if len(p) >= ctx:
                raise EvalError(
                    f"prompt {i} has {len(p)} tokens, longer than the context ({ctx} positions, the "
                    "smaller of the target's and the draft's max_position_embeddings) minus one new "
                    "token; shorten or drop it"
                )
            budgets.append(min(max_new_tokens, ctx - len(p)))
            reasons_ctx.append(budgets[-1] < max_new_tokens)
        stops = stop_token_ids(target, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
        gens = greedy_generate(target.model, prompt_ids, budgets, stops, pad, batch_size, progress, lookahead)
        continuations = [g.tokens for g in gens]
        reasons = [("context" if cut and g.stop_reason == "length" else g.stop_reason)
                   for g, cut in zip(gens, reasons_ctx, strict=True)]
        ahead = [[] if r == "context" else g.lookahead for g, r in zip(gens, reasons, strict=True)]
        sequences = [p + c for p, c in zip(prompt_ids, continuations, strict=True)]
        aux = _aux_states(target, sequences, aux_batch_tokens, progress)
        completions = [tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
        return cls(prompt_ids, continuations, reasons, aux, tuple(target.aux_layer_ids), max_new_tokens,
                   completions, ahead)

    def head(self, n: int) -> ContinuationSet:
        """The first `n` prompts (a view sharing the aux tensors)."""
        return ContinuationSet(self.prompt_ids[:n], self.continuations[:n], self.stop_reasons[:n], self.aux[:n],
                               self.aux_layer_ids, self.max_new_tokens, self.completions[:n], self.lookahead[:n])

    def save(self, path: str | Path) -> None:
        """torch.save the set (aux states included) so a second run skips generation."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"prompt_ids": self.prompt_ids, "continuations": self.continuations,
                    "stop_reasons": self.stop_reasons, "aux": self.aux,
                    "aux_layer_ids": list(self.aux_layer_ids), "max_new_tokens": self.max_new_tokens,
                    "completions": self.completions, "lookahead": self.lookahead}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ContinuationSet:
        """A set written by `save` (CPU tensors)."""
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(d["prompt_ids"], d["continuations"], d["stop_reasons"], d["aux"],
                   tuple(d["aux_layer_ids"]), d["max_new_tokens"], d.get("completions", []), d.get("lookahead", []))
