"""Exact offline acceptance length of a P-EAGLE draft, with vLLM's greedy semantics.

Why one forward is enough (docs/evaluation.md): in vLLM's parallel-drafting runtime every draft
slot reads only verified tokens, the target's aux states and the fixed mask slots — never the
draft's own guesses. So over the target's greedy continuation, a single teacher-forced draft forward
with every position as an anchor and all K depths yields, for every anchor, exactly the K tokens
vLLM would propose there. Simulating vLLM's rounds over that table gives the acceptance counts of a
real greedy serving run, without a serving engine.

Conventions (docs/conventions.md). Tokens x_0..x_{T−1} = prompt x_0..x_{P−1} + greedy continuation x_P..x_{T−1};
g_t = the target's aux state at position t. Shifted element i = (token x_{i+1}, aux g_i), position i.
Depth 0 of anchor a is the bonus slot (x_{a+1}, g_a) and depth d is mask slot d; depth d predicts
x_{a+d+2}. Rounds: the first draft after prefill has anchor a = P−1 (bonus token x_P from the
prefill); a round accepts m = the longest prefix of depths 0..K−1 whose draft equals the target's
token, the next anchor is a + m + 1.

End of generation (the convention both the one-pass simulation and `literal_speculative_decode`
use): generation stops at a stop token (EOS / generation_config eos ids, kept in the output) or
after the per-prompt token budget. A round is proposed whenever the request is still running after
its bonus token, i.e. while a + 2 ≤ T − 1, even when fewer than K tokens remain (vLLM proposes and
counts those drafts too). What counts as accepted (docs/evaluation.md): vLLM's counters include the
last round's drafts that agree with the target past the stop token or past max_tokens (then cut
from the output), so by default every depth is compared with the target's greedy tokens extended
K − 1 tokens past each end (`ContinuationSet.lookahead`); the "useful" figure stops at the end.

Metrics follow vLLM (docs/evaluation.md): num_drafts (rounds), AL = 1 + accepted / drafts, cumulative
per-position rates (rate[i] = fraction of drafts with ≥ i + 1 accepted), draft acceptance rate =
accepted / (drafts · K). AL for K' < K is a separate simulation over the same draft-token table
(the path of anchors changes with K'; depth d's prediction does not depend on deeper slots).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from .cod import chain_table, document_starts
from .draft import PEagleDraft
from .mask import CODAttention

__all__ = [
    "ContinuationSet",
    "EvalError",
    "EvalResult",
    "acceptance_metrics",
    "acceptance_on",
    "check_verifier",
    "cli_main",
    "compare_with_vllm",
    "draft_token_tables",
    "evaluate",
    "format_report",
    "Generation",
    "greedy_generate",
    "leading_matches",
    "literal_speculative_decode",
    "load_draft",
    "load_prompts",
    "scalar_metrics",
    "simulate_rounds",
    "stop_token_ids",
    "tokenize_prompts",
    "write_plots",
]

END_CONVENTION = (
    "vLLM's counters: rounds while the request runs after its bonus token (a+2 <= T-1); in the last round "
    "every draft token the verifier accepts counts, also past the stop token or max_tokens"
)
USEFUL_CONVENTION = (
    "accepted tokens counted only up to the end of the output (stop token included, nothing past it): "
    "the tokens speculative decoding actually saved"
)


class EvalError(ValueError):
    """Unusable evaluation input (prompt too long, bad prompt file, draft/target mismatch)."""


# ------------------------------------------------------------------------------------------------
# Metrics and the round simulation (pure functions)


def acceptance_metrics(accepted_counts: Sequence[int], k: int) -> dict[str, Any]:
    """vLLM's speculative-decoding metrics from the accepted count of every draft round.

    Returns num_drafts, num_draft_tokens (= drafts·K), num_accepted_tokens, acceptance_length
    (1 + accepted/drafts, the bonus token included), per_position (cumulative: rate[i] = fraction
    of drafts whose first i+1 tokens were accepted, so AL = 1 + Σ rate) and draft_acceptance_rate
    (accepted / draft tokens). Rates are NaN when there was no draft.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"K must be an int >= 1, got {k!r}")
    counts = [int(m) for m in accepted_counts]
    bad = [m for m in counts if not 0 <= m <= k]
    if bad:
        raise ValueError(f"accepted counts must lie in [0, K={k}], got {bad[:5]}")
    drafts = len(counts)
    accepted = sum(counts)
    nan = float("nan")
    per_pos_counts = [sum(1 for m in counts if m >= i + 1) for i in range(k)]
    return {
        "num_drafts": drafts,
        "num_draft_tokens": drafts * k,
        "num_accepted_tokens": accepted,
        "acceptance_length": 1.0 + accepted / drafts if drafts else nan,
        "per_position": [c / drafts if drafts else nan for c in per_pos_counts],
        "draft_acceptance_rate": accepted / (drafts * k) if drafts else nan,
    }


def leading_matches(draft_tokens: Tensor, tokens: Tensor | Sequence[int]) -> Tensor:
    """[n]: for each anchor a, how many leading depths d have draft_tokens[a, d] == x_{a+d+2}.

    draft_tokens [n, K] holds target ids (−1 = not computed); tokens = the whole sequence x (prompt +
    continuation). Depths whose token would lie past the end never match, so the result is already
    capped at the T − a − 2 tokens that remain after the bonus token.
    """
    x = torch.as_tensor(tokens, dtype=torch.long).cpu()
    table = draft_tokens.cpu().long()
    n, k = table.shape
    t = x.numel()
    idx = torch.arange(n)[:, None] + torch.arange(k)[None, :] + 2
    valid = idx <= t - 1
    truth = x[idx.clamp(max=max(t - 1, 0))] if t else torch.full_like(idx, -1)
    match = (table == truth) & valid & (table >= 0)
    return match.long().cumprod(dim=1).sum(dim=1)


def simulate_rounds(runs: Tensor | Sequence[int], prompt_len: int, seq_len: int, k: int) -> list[int]:
    """vLLM's greedy rounds: accepted count per round from per-anchor leading-match lengths.

    runs[a] = leading_matches(...)[a] (computed with any K_max ≥ k). Start at anchor P − 1, accept
    m = min(runs[a], k), move to a + m + 1, repeat while a + 2 ≤ T − 1 (the request still runs).
    """
    runs = [int(r) for r in (runs.tolist() if isinstance(runs, Tensor) else runs)]
    counts = []
    a = prompt_len - 1
    while a + 2 <= seq_len - 1:
        m = min(runs[a], k)
        counts.append(m)
        a += m + 1
    return counts


# ------------------------------------------------------------------------------------------------
# Prompts


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read prompt records from a JSONL file (or a JSON list); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"prompt file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list):
            raise EvalError(f"{path}: expected a JSON list of prompt records")
        out = [_check_record(r, f"{path}[{i}]") for i, r in enumerate(records, 1)]
        if not out:
            raise EvalError(f"{path}: no prompts")
        return out
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        out.append(_check_record(obj, f"{path}:{lineno}"))
    if not out:
        raise EvalError(f"{path}: no prompts")
    return out


def _check_record(obj: Any, where: str) -> dict[str, Any]:
    if isinstance(obj, str):
        return {"prompt": obj, "_where": where}
    if hasattr(obj, "messages") and not isinstance(obj, Mapping):  # a peagle.data.Record
        return {"messages": obj.messages, "tools": getattr(obj, "tools", None), "_where": where}
    keys = ("prompt", "text", "messages", "conversations", "input_ids")
    if not isinstance(obj, Mapping) or not any(k in obj for k in keys):
        raise EvalError(f"{where}: expected an object with one of {', '.join(repr(k) for k in keys)}")
    ids = obj.get("input_ids")
    if ids is not None and (not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids)):
        raise EvalError(f"{where}: 'input_ids' must be a non-empty list of token ids")
    return {**obj, "_where": where}


def _chat_messages(record: Mapping[str, Any], where: str) -> tuple[list[dict[str, Any]], Any]:
    """(messages, tools) of a chat record, normalised like training data, trailing answers dropped."""
    from .data import _normalise

    raw = {k: v for k, v in record.items() if k in ("messages", "conversations", "tools")}
    try:
        rec = _normalise(raw, where, 0)
    except ValueError as e:
        raise EvalError(str(e).replace(f"{where}:0", where)) from None
    messages = rec.messages
    while messages and messages[-1]["role"] == "assistant":  # the target writes the answer itself
        messages = messages[:-1]
    if not messages:
        raise EvalError(f"{where}: no message before the assistant turn")
    return messages, rec.tools


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[Any], chat_template: str | None = None
) -> list[list[int]]:
    """Token ids of every prompt, rendered as in training.

    - ``{"messages": [...]}`` / ``{"conversations": [...]}``: the chat template with the
      generation prompt; trailing assistant turns are dropped (a training record can be used as is);
    - ``{"prompt": "..."}`` or a bare string: one user message through the chat template (raw text
      when the tokenizer has no template); ``{"prompt": [messages]}`` is a chat;
    - ``{"text": "..."}``: raw text, tokenized with the tokenizer's special tokens (no template);
    - ``{"input_ids": [...]}``: already tokenized (e.g. the prompt of a prepared held-out example), used as is.
    """
    from .data import resolve_chat_template

    template = chat_template or getattr(tokenizer, "chat_template", None) or None
    if isinstance(template, dict):
        template = template.get("default")
    out = []
    for i, rec in enumerate(prompts):
        if not (isinstance(rec, Mapping) and "_where" in rec):
            rec = _check_record(rec, f"prompt {i}")
        where = rec["_where"]
        if "input_ids" in rec:
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in rec["input_ids"]):
                raise EvalError(f"{where}: 'input_ids' holds ids outside the tokenizer's vocabulary (0..{vocab - 1})")
            out.append(list(rec["input_ids"]))
            continue
        is_chat = "messages" in rec or "conversations" in rec
        if not is_chat and "prompt" not in rec:  # {"text": ...}
            out.append(list(tokenizer(str(rec["text"]), add_special_tokens=True)["input_ids"]))
            continue
        if is_chat:
            messages, tools = _chat_messages(rec, where)
        elif isinstance(rec["prompt"], list):
            messages, tools = _chat_messages({"messages": rec["prompt"]}, where)
        elif template:
            messages, tools = [{"role": "user", "content": str(rec["prompt"])}], None
        else:
            out.append(list(tokenizer(str(rec["prompt"]), add_special_tokens=True)["input_ids"]))
            continue
        tpl = resolve_chat_template(tokenizer, template)
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=tpl, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # the template rejected the record (jinja raise_exception)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvalError(f"{where}: the chat template rejected this prompt: {msg}") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise EvalError(f"{where}: the prompt tokenizes to nothing")
        out.append(ids)
    return out


# ------------------------------------------------------------------------------------------------
# Target helpers


def _load_tokenizer(target: Any) -> Any:
    from transformers import AutoTokenizer

    tok = getattr(target, "tokenizer", None)
    return tok if tok is not None else AutoTokenizer.from_pretrained(str(target.path))


def stop_token_ids(target: Any, tokenizer: Any = None) -> list[int]:
    """The ids that end a generation, as vLLM uses them: generation_config eos ids + tokenizer eos."""
    ids: list[int] = []
    gen = getattr(target.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(target.model.config, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tok_eos is not None:
        ids.append(int(tok_eos))
    return sorted({int(i) for i in ids})


def _context_length(target: Any, draft: PEagleDraft | None) -> int:
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
) -> list[Generation]:
    """Greedy continuations of token-id prompts with HF generate (KV cache, left-padded batches);
    sampled (temperature, top_p) when temperature > 0.

    Prompts of equal budget (max new tokens) are batched, shortest first (least padding). Returns a
    `Generation` per prompt, in input order. With `lookahead` = n, generation goes on n tokens past each
    continuation's end, ignoring stop ids: the target's tokens that vLLM's verifier compares the last
    round's drafts with (docs/evaluation.md, "What vLLM counts").
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    order = sorted(range(len(prompt_ids)), key=lambda i: (budgets[i], len(prompt_ids[i])))
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


# ------------------------------------------------------------------------------------------------
# The prepared prompt set


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

    @property
    def generated_tokens(self) -> int:
        return sum(len(c) for c in self.continuations)

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
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(target)
        if chat_template is not None:
            from .data import load_chat_template

            chat_template = load_chat_template(chat_template)
        records = load_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        if limit is not None:
            records = records[:limit]
        if not records:
            raise EvalError("no prompts to evaluate")
        prompt_ids = tokenize_prompts(tokenizer, records, chat_template)
        ctx = max_context if max_context is not None else _context_length(target, None)
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
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(d["prompt_ids"], d["continuations"], d["stop_reasons"], d["aux"],
                   tuple(d["aux_layer_ids"]), d["max_new_tokens"], d.get("completions", []), d.get("lookahead", []))


# ------------------------------------------------------------------------------------------------
# The one-pass draft forward


def _argmax_target_ids(draft: PEagleDraft, h: Tensor, max_logits: int = 1 << 24) -> Tensor:
    """Greedy draft tokens, mapped to target ids (target = draft id + d2t[draft id])."""
    vd = draft.lm_head.weight.shape[0]
    rows = max(1, max_logits // vd)
    out = [draft.draft_to_target(draft.logits(h[i:i + rows]).argmax(dim=-1)) for i in range(0, h.shape[0], rows)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=h.device)


def _groups(cs: ContinuationSet, max_positions: int) -> list[list[int]]:
    groups: list[list[int]] = []
    size = 0
    for j in range(len(cs)):
        n = len(cs.prompt_ids[j]) + len(cs.continuations[j]) - 1
        if groups and size + n <= max_positions:
            groups[-1].append(j)
            size += n
        else:
            groups.append([j])
            size = n
    return groups


def _check_compatible(draft: PEagleDraft, cs: ContinuationSet) -> None:
    cfg = draft.config
    if cfg.aux_layer_ids is not None and tuple(cfg.aux_layer_ids) != tuple(cs.aux_layer_ids):
        raise EvalError(f"the draft was trained on aux layers {tuple(cfg.aux_layer_ids)} but the target states "
                        f"were captured at {tuple(cs.aux_layer_ids)}")
    if cs.aux and cs.aux[0].shape[-1] != cfg.fc_in_features:
        raise EvalError(f"target aux states have width {cs.aux[0].shape[-1]}, the draft's fc expects "
                        f"{cfg.fc_in_features}")


@torch.no_grad()
def draft_token_tables(
    draft: PEagleDraft,
    cs: ContinuationSet,
    k: int,
    *,
    max_positions: int = 8192,
    chunk_elements: int = 8192,
    progress: bool = False,
) -> list[Tensor]:
    """Per prompt, the draft's greedy tokens [n_j, K] (target ids; row = anchor, column = depth).

    One teacher-forced forward per group of prompts (packed as separate documents): the depth-0
    stream (every position, real token + aux) runs once through `peagle.mask.CODAttention`, its
    per-layer keys/values are kept, and the mask slots (depth ≥ 1, mask token + projected
    mask_hidden, position anchor + depth) of anchors that can be visited by a round (a ≥ P − 1,
    reference inside the output) run in chunks of whole chains against that context — exactly the
    COD mask, so results do not depend on the chunking. Entries that no round can read are −1.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"K must be an int >= 1, got {k!r}")
    _check_compatible(draft, cs)
    was_training = draft.training
    draft.eval()
    device = draft.fc.weight.device
    dtype = draft.fc.weight.dtype
    tables: list[Tensor] = [torch.empty(0)] * len(cs)
    groups = _groups(cs, max_positions)
    bar = tqdm(total=sum(len(cs.sequence(j)) - 1 for j in range(len(cs))), desc="score", unit="pos",
               disable=not progress)
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            for grp in groups:
                for j, table in zip(grp, _score_group(draft, cs, grp, k, chunk_elements, device, dtype),
                                    strict=True):
                    tables[j] = table
                bar.update(sum(len(cs.sequence(j)) - 1 for j in grp))
    finally:
        bar.close()
        draft.train(was_training)
    return tables


def _score_group(
    draft: PEagleDraft, cs: ContinuationSet, grp: list[int], k: int, chunk_elements: int,
    device: torch.device, dtype: torch.dtype,
) -> list[Tensor]:
    ids_parts, aux_parts, doc_parts, lo_parts, hi_parts = [], [], [], [], []
    offsets = []
    off = 0
    for local, j in enumerate(grp):
        seq = cs.sequence(j)
        n = len(seq) - 1
        offsets.append(off)
        ids_parts.append(torch.tensor(seq[1:], dtype=torch.long))
        aux_parts.append(cs.aux[j][:n])
        doc_parts.append(torch.full((n,), local, dtype=torch.long))
        # anchors a round can visit: P−1 ≤ a ≤ T−3 = n−2 (every depth: vLLM counts drafts past the end)
        lo_parts.append(torch.full((n,), off + len(cs.prompt_ids[j]) - 1, dtype=torch.long))
        hi_parts.append(torch.full((n,), off + n - 2, dtype=torch.long))
        off += n
    total = off
    sizes = [len(cs.sequence(j)) - 1 for j in grp]
    if total == 0:
        return [torch.full((n, k), -1, dtype=torch.long) for n in sizes]
    ids = torch.cat(ids_parts).to(device)
    aux = torch.cat(aux_parts).to(device=device, dtype=dtype)
    docs = torch.cat(doc_parts).to(device)
    lo, hi = torch.cat(lo_parts).to(device), torch.cat(hi_parts).to(device)
    starts = document_starts(docs)
    flat = torch.arange(total, device=device)
    positions = flat - starts
    table = torch.full((total, k), -1, dtype=torch.long, device=device)

    # depth-0 stream: every position (prompt positions are context), keys/values recorded
    record: dict = {}
    attn0 = CODAttention(starts, flat, torch.empty((total, 0), dtype=torch.long, device=device),
                         num_context=total, record=record)
    h0 = draft(ids, draft.project_aux(aux), positions, attn0)
    context = [record[i] for i in range(len(record))]
    visit = (flat >= lo) & (flat <= hi)
    rows = visit.nonzero().squeeze(1)
    if rows.numel():
        table[rows, 0] = _argmax_target_ids(draft, h0[rows])
    del h0

    if k > 1 and rows.numel():
        # every depth of every visited anchor (depth-major blocks, as COD lays them out); the depth-0
        # rows only keep chain_table aligned and are dropped below (the stream above computed them)
        anchor = rows.repeat(k)
        depth = torch.arange(k, device=device).repeat_interleave(rows.numel())
        chains = chain_table(anchor, depth, k)[:, 1:]
        cols = torch.arange(1, k, device=device)
        chains = torch.where(cols[None, :] <= depth[:, None], chains, -1)
        deep = (depth > 0).nonzero().squeeze(1)
        deep = deep[torch.argsort(anchor[deep], stable=True)]  # whole chains, anchor order
        chain_anchors = torch.unique_consecutive(anchor[deep])
        per_chunk = max(1, chunk_elements // (k - 1))
        mask_row = draft.projected_mask_hidden().to(dtype)
        mask_id = draft.config.mask_token_id
        lookup = torch.full((anchor.numel(),), -1, dtype=torch.long, device=device)
        bounds = torch.searchsorted(anchor[deep].contiguous(), chain_anchors[::per_chunk].contiguous())
        bounds = torch.cat([bounds, torch.tensor([deep.numel()], device=device)])
        for c in range(bounds.numel() - 1):
            elems = deep[int(bounds[c]):int(bounds[c + 1])]
            lookup[elems] = torch.arange(elems.numel(), device=device)
            ch = chains[elems]
            ch = torch.where(ch >= 0, lookup[ch.clamp(min=0)], -1)
            a, d = anchor[elems], depth[elems]
            attn = CODAttention(starts[a], a, ch, context=context)
            h = draft(torch.full_like(a, mask_id), mask_row.reshape(1, -1).expand(a.numel(), -1),
                      positions[a] + d, attn)
            table[a, d] = _argmax_target_ids(draft, h)
            lookup[elems] = -1
    table = table.cpu()
    return [table[o:o + n] for o, n in zip(offsets, sizes, strict=True)]


# ------------------------------------------------------------------------------------------------
# Acceptance of a draft on a prepared set


def _rounds_by_k(cs: ContinuationSet, tables: list[Tensor], k: int, *, useful: bool = False
                 ) -> list[dict[int, list[int]]]:
    """Per prompt, {K': accepted count per round} for K' = 1..K.

    Default: vLLM's counters, which compare the last round's drafts with the target's tokens past the end
    of the output too (`lookahead`); ``useful=True``: accepted tokens counted up to the end of the output.
    The rounds themselves are the same either way.
    """
    out = []
    for j, table in enumerate(tables):
        seq = cs.sequence(j)
        truth = seq
        if not useful:
            ahead = cs.lookahead[j] if j < len(cs.lookahead) else []
            if len(ahead) < k - 1 and cs.stop_reasons[j] != "context":
                raise EvalError(f"prompt {j}: the prepared set keeps {len(ahead)} target tokens past the end, "
                                f"vLLM's counters at K={k} need {k - 1} (ContinuationSet.prepare(lookahead=...))")
            truth = seq + list(ahead)
        runs = leading_matches(table, truth).tolist()
        out.append({kk: simulate_rounds(runs, len(cs.prompt_ids[j]), len(seq), kk) for kk in range(1, k + 1)})
    return out


def _summarise(cs: ContinuationSet, rounds: list[dict[int, list[int]]], k: int,
               useful: list[dict[int, list[int]]] | None = None) -> tuple[dict, dict, list]:
    by_k = _metrics_by_k(rounds, k)
    per_prompt = []
    for j, r in enumerate(rounds):
        met = acceptance_metrics(r[k], k)
        row = {
            "index": j,
            "prompt_tokens": len(cs.prompt_ids[j]),
            "generated_tokens": len(cs.continuations[j]),
            "stop_reason": cs.stop_reasons[j],
            **met,
            "acceptance_length_by_k": {str(kk): acceptance_metrics(r[kk], kk)["acceptance_length"]
                                       for kk in range(1, k + 1)},
            "accepted_per_round": list(r[k]),
        }
        if useful is not None:
            row["useful_acceptance_length"] = acceptance_metrics(useful[j][k], k)["acceptance_length"]
            row["useful_accepted_per_round"] = list(useful[j][k])
        if j < len(cs.completions):
            row["completion"] = cs.completions[j]
        per_prompt.append(row)
    return by_k[k], by_k, per_prompt


def _metrics_by_k(rounds: list[dict[int, list[int]]], k: int) -> dict[int, dict[str, Any]]:
    """vLLM's metrics for every K' = 1..K over all prompts' rounds."""
    return {kk: acceptance_metrics([m for r in rounds for m in r[kk]], kk) for kk in range(1, k + 1)}


def acceptance_on(
    draft: PEagleDraft, continuation_set: ContinuationSet, k: int | None = None, *,
    max_positions: int = 8192, chunk_elements: int = 8192,
) -> dict[str, Any]:
    """Re-score a draft on a prepared set: vLLM metrics at K plus AL for every K' ≤ K.

    The cheap entry point for the training loop (one forward, no target, no generation). Returns
    `acceptance_metrics(...)` at K plus "acceptance_length_by_k" {K': AL} and "num_speculative_tokens".
    The draft is put in eval mode, run without autocast and returned to its previous mode.
    """
    k = int(k if k is not None else draft.config.num_speculative_tokens)
    tables = draft_token_tables(draft, continuation_set, k, max_positions=max_positions,
                                chunk_elements=chunk_elements)
    overall, by_k, _ = _summarise(continuation_set, _rounds_by_k(continuation_set, tables, k), k)
    useful = _metrics_by_k(_rounds_by_k(continuation_set, tables, k, useful=True), k)
    return {**overall, "num_speculative_tokens": k,
            "acceptance_length_by_k": {kk: m["acceptance_length"] for kk, m in by_k.items()},
            "useful_acceptance_length_by_k": {kk: m["acceptance_length"] for kk, m in useful.items()}}


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flat float scalars of an `acceptance_on` result for a metrics log / TensorBoard:
    al, al_k{K'}, accept_pos{i} (cumulative, 1-based), draft_accept_rate, drafts."""
    out = {f"{prefix}al": float(metrics["acceptance_length"]),
           f"{prefix}draft_accept_rate": float(metrics["draft_acceptance_rate"]),
           f"{prefix}drafts": float(metrics["num_drafts"])}
    for kk, al in metrics.get("acceptance_length_by_k", {}).items():
        out[f"{prefix}al_k{kk}"] = float(al)
    for i, r in enumerate(metrics["per_position"]):
        out[f"{prefix}accept_pos{i + 1}"] = float(r)
    return out


# ------------------------------------------------------------------------------------------------
# The literal loop (the proof)


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
    stop = set(stop_ids if stop_ids is not None else stop_token_ids(target, _load_tokenizer(target)))
    device = draft.fc.weight.device
    dtype = draft.fc.weight.dtype
    model = target.model
    mask_id = draft.config.mask_token_id

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
            real = draft.project_aux(aux[: a + 1].to(device=device, dtype=dtype))
            mask_rows = draft.projected_mask_hidden().to(dtype).reshape(1, -1).expand(k - 1, -1)
            ids = torch.tensor(tokens[1:a + 2] + [mask_id] * (k - 1), dtype=torch.long, device=device)
            pos = torch.arange(a + k, device=device)
            h = draft(ids, torch.cat([real, mask_rows]), pos, _causal_attention)
            drafts = _argmax_target_ids(draft, h[a:a + k]).tolist()
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


# ------------------------------------------------------------------------------------------------
# Full evaluation: result, report, plots


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


@dataclass
class EvalResult:
    """Everything `evaluate` measured; `to_json()` is the `--json` schema."""

    num_speculative_tokens: int
    overall: dict[str, Any]
    by_k: dict[int, dict[str, Any]]
    prompts: list[dict[str, Any]]
    timing: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    useful_by_k: dict[int, dict[str, Any]] = field(default_factory=dict)
    vllm: dict[str, Any] | None = None  # `peagle eval --engine vllm`: the engine's own counters per K'

    @property
    def acceptance_length(self) -> dict[int, float]:
        """Mean acceptance length for every K' = 1..K."""
        return {kk: m["acceptance_length"] for kk, m in self.by_k.items()}

    @property
    def per_position(self) -> list[float]:
        return list(self.overall["per_position"])

    @property
    def num_drafts(self) -> int:
        return int(self.overall["num_drafts"])

    def to_json(self) -> dict[str, Any]:
        o = self.overall
        return _jsonable({
            "acceptance_length": {str(kk): v for kk, v in self.acceptance_length.items()},
            "per_position": o["per_position"],
            "num_drafts": o["num_drafts"],
            "prompts": self.prompts,
            "num_speculative_tokens": self.num_speculative_tokens,
            "draft_acceptance_rate": o["draft_acceptance_rate"],
            "num_draft_tokens": o["num_draft_tokens"],
            "num_accepted_tokens": o["num_accepted_tokens"],
            "by_k": {str(kk): m for kk, m in self.by_k.items()},
            "num_prompts": len(self.prompts),
            "generated_tokens": sum(p["generated_tokens"] for p in self.prompts),
            "semantics": "vLLM greedy parallel drafting (temperature 0), exact offline simulation",
            "end_convention": END_CONVENTION,
            "useful": {
                "meaning": USEFUL_CONVENTION,
                "acceptance_length": {str(kk): m["acceptance_length"] for kk, m in self.useful_by_k.items()},
                "by_k": {str(kk): m for kk, m in self.useful_by_k.items()},
            },
            **({"vllm": self.vllm} if self.vllm is not None else {}),
            "timing": self.timing,
        })


def _fmt(v: float, spec: str = ".3f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def format_report(result: EvalResult, max_prompt_rows: int = 20) -> str:
    """The terminal table: AL / draft acceptance per K', per-position rates, per-prompt rows."""
    k = result.num_speculative_tokens
    n_gen = sum(p["generated_tokens"] for p in result.prompts)
    lines = [f"Acceptance (vLLM greedy parallel drafting, exact offline) — {len(result.prompts)} prompts, "
             f"{n_gen} generated tokens, {result.num_drafts} drafts at K={k}", "",
             f"{'K':>3}  {'mean AL':>8}  {'useful AL':>9}  {'draft acc.':>10}  {'drafts':>7}  {'accepted':>8}"
             + ("  | vLLM: drafts  accepted   AL     agree" if result.vllm else "")]
    for kk, m in result.by_k.items():
        useful = result.useful_by_k.get(kk, {}).get("acceptance_length", float("nan"))
        line = (f"{kk:>3}  {_fmt(m['acceptance_length']):>8}  {_fmt(useful):>9}  "
                f"{_fmt(m['draft_acceptance_rate']):>10}  {m['num_drafts']:>7}  {m['num_accepted_tokens']:>8}")
        served = (result.vllm or {}).get("by_k", {}).get(str(kk))
        if served:
            line += (f"  |       {served['num_drafts']:>6}  {served['num_accepted_tokens']:>8}  "
                     f"{_fmt(served['acceptance_length']):>5}  {'yes' if served['agrees'] else 'NO':>5}")
        lines.append(line)
    lines.append("mean AL = what vLLM's counters report (drafts accepted past the end of a request count too); "
                 "useful AL = accepted tokens inside the output only")
    lines += ["", f"per-position acceptance (cumulative) at K={k}:",
              "  " + "  ".join(f"pos{i + 1} {_fmt(r)}" for i, r in enumerate(result.per_position)), ""]
    if result.vllm:
        served = result.vllm["by_k"][str(k)]
        lines += [f"vLLM accepted tokens per position at K={k}: {served['accepted_per_position']} "
                  f"(offline {served['offline']['accepted_per_position']}); outputs equal to the offline "
                  f"continuations: {served['outputs_equal_offline']}/{len(result.prompts)}"]
        for kk, rows in result.vllm["differences"].items():
            lines += [f"K={kk}: prompts whose counters differ (offline vs vLLM drafts / accepted): "
                      + ", ".join(f"#{d['index']} {d['offline_drafts']}/{d['offline_accepted']} vs "
                                  f"{d['vllm_drafts']}/{d['vllm_accepted']}" for d in rows[:20])]
        lines.append("")
    lines.append(f"{'prompt':>6}  {'prompt tok':>10}  {'new tok':>7}  {'stop':>7}  {'drafts':>6}  {'AL':>6}")
    for p in result.prompts[:max_prompt_rows]:
        lines.append(f"{p['index']:>6}  {p['prompt_tokens']:>10}  {p['generated_tokens']:>7}  "
                     f"{p['stop_reason']:>7}  {p['num_drafts']:>6}  {_fmt(p['acceptance_length'], '.2f'):>6}")
    if len(result.prompts) > max_prompt_rows:
        lines.append(f"  … {len(result.prompts) - max_prompt_rows} more prompts in the JSON output")
    return "\n".join(lines)


def write_plots(result: EvalResult, out_dir: str | Path) -> dict[str, str]:
    """acceptance_per_position.png, al_vs_k.png, al_histogram.png under out_dir."""
    from . import plots

    out_dir = Path(out_dir)
    k = result.num_speculative_tokens
    files = {
        "per_position": plots.plot_acceptance_bars(
            result.per_position, out_dir / "acceptance_per_position.png",
            title=f"Per-position acceptance at K={k} (cumulative)"),
        "al_vs_k": plots.plot_al_vs_k(result.acceptance_length, out_dir / "al_vs_k.png"),
        "al_histogram": plots.plot_al_histogram(
            [p["acceptance_length"] for p in result.prompts], out_dir / "al_histogram.png",
            title=f"Acceptance length per prompt at K={k}"),
    }
    return {name: str(path) for name, path in files.items()}


def evaluate(
    target: Any,
    draft: PEagleDraft,
    prompts: str | Path | Sequence[Any] | ContinuationSet,
    max_new_tokens: int = 256,
    num_speculative_tokens: int | None = None,
    out_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    *,
    tokenizer: Any = None,
    chat_template: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    print_report: bool = True,
    vllm_draft_dir: str | Path | None = None,
    allow_other_target: bool = False,
) -> EvalResult:
    """Exact offline acceptance of `draft` on `target`'s greedy continuations of `prompts`.

    prompts: a JSONL/JSON file, a list of records (see `tokenize_prompts`) or a prepared
    `ContinuationSet`. K defaults to the draft's trained `num_speculative_tokens`. Writes the JSON
    (`json_path`) and the PNG plots (`out_dir`), prints the table, returns an `EvalResult`. With
    `vllm_draft_dir` (the draft in speculators format) the real vLLM also serves target + draft on the
    same prompts and its own counters go beside the prediction (`EvalResult.vllm`).
    """
    trained_k = int(draft.config.num_speculative_tokens)
    k = int(num_speculative_tokens if num_speculative_tokens is not None else trained_k)
    if k < 1:
        raise EvalError(f"num_speculative_tokens must be >= 1, got {k}")
    if k > trained_k:
        raise EvalError(f"--num-speculative-tokens {k} exceeds the draft's trained K ({trained_k}, its num_depths): "
                        f"depths ≥ {trained_k} were never trained; use K ≤ {trained_k}")
    if int(draft.config.vocab_size) != int(target.vocab_size):
        raise EvalError(f"the draft was built for a vocabulary of {draft.config.vocab_size} tokens, the target "
                        f"has {target.vocab_size}: is it the draft of this target?")
    if not allow_other_target:
        check_verifier(draft, target, tokenizer)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(prompts, ContinuationSet):
        cs = prompts
    else:
        cs = ContinuationSet.prepare(target, prompts, max_new_tokens, tokenizer=tokenizer,
                                     chat_template=chat_template, max_context=_context_length(target, draft),
                                     batch_size=batch_size, lookahead=k - 1, progress=progress)
    timing["generate_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    tables = draft_token_tables(draft, cs, k, progress=progress)
    useful = _rounds_by_k(cs, tables, k, useful=True)
    overall, by_k, per_prompt = _summarise(cs, _rounds_by_k(cs, tables, k), k, useful)
    timing["score_s"] = time.perf_counter() - t1
    result = EvalResult(k, overall, by_k, per_prompt, timing, useful_by_k=_metrics_by_k(useful, k))
    if vllm_draft_dir is not None:
        t2 = time.perf_counter()
        result.vllm = compare_with_vllm(cs, _rounds_by_k(cs, tables, k), target, vllm_draft_dir, k,
                                        max_context=_context_length(target, draft))
        timing["vllm_s"] = time.perf_counter() - t2
    if out_dir is not None:
        result.files.update(write_plots(result, out_dir))
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        result.files["json"] = str(json_path)
    if print_report:
        print(format_report(result))
        for name, path in result.files.items():
            print(f"{name}: {path}")
    return result


# ------------------------------------------------------------------------------------------------
# CLI


def check_verifier(draft: PEagleDraft, target: Any, tokenizer: Any = None) -> None:
    """Refuse a target the draft was not trained for: width, aux layers, and the recorded fingerprint
    (shape, tokenizer vocabulary, final-norm weights; `peagle.target.verifier_fingerprint`)."""
    from .target import TargetError, resolve_aux_layer_ids, verifier_fingerprint

    cfg = draft.config
    if int(cfg.target_hidden_size) != int(target.hidden_size):
        raise EvalError(f"the draft was trained on a target of hidden size {cfg.target_hidden_size}, this target "
                        f"has {target.hidden_size}: is it the draft of this target?")
    try:
        resolve_aux_layer_ids(cfg.aux_layer_ids, int(target.num_layers))
    except TargetError as e:
        raise EvalError(f"the draft's {e}") from None
    recorded = cfg.verifier_fingerprint
    if not recorded:
        return
    now = verifier_fingerprint(target, tokenizer if tokenizer is not None else _load_tokenizer(target))
    diff = [f"{k} {recorded[k]!r} vs {now.get(k)!r}" for k in sorted(recorded) if recorded[k] != now.get(k)]
    if diff:
        raise EvalError(f"the draft was trained for another target than {target.path} ({'; '.join(diff)}); "
                        "evaluate it with its own target, or pass --allow-other-target")


def _per_position_counts(rounds: Sequence[int], k: int) -> list[int]:
    """vLLM's accepted_per_pos: how many drafts had depth i accepted (i.e. at least i + 1 accepted)."""
    return [sum(1 for m in rounds if m >= i + 1) for i in range(k)]


def compare_with_vllm(
    cs: ContinuationSet, rounds: list[dict[int, list[int]]], target: Any, draft_dir: str | Path, k: int,
    *, max_context: int,
) -> dict[str, Any]:
    """Serve `cs`'s prompts in the real vLLM for K' = 1..k; its counters beside the offline prediction.

    The same token ids, budgets (max new tokens, cut at the context) and stop ids as the prediction. When a
    K' disagrees, its prompts are served again one at a time and the ones whose counters differ are listed
    (index, offline vs vLLM drafts and accepted tokens).
    """
    from .vllm_engine import served_counters

    budgets = [min(cs.max_new_tokens, max_context - len(p)) for p in cs.prompt_ids]
    stops = stop_token_ids(target, _load_tokenizer(target))
    # room for the longest request plus generous room for its last rounds' draft slots (vLLM clips drafts
    # near max_model_len: measured, +K+1 changed its counters, +19 did not), not the whole context (KV memory)
    longest = max(len(p) + b for p, b in zip(cs.prompt_ids, budgets, strict=True))
    engine_len = min(max_context, longest + 4 * (k + 1) + 64)
    served = served_counters(target.path, draft_dir, cs.prompt_ids, budgets, stops, range(1, k + 1),
                             max_model_len=engine_len)
    out: dict[str, Any] = {"by_k": {}, "agrees": True, "differences": {}}
    for kk, res in served.items():
        offline = [m for r in rounds for m in r[kk]]
        mine = {"num_drafts": len(offline), "num_accepted_tokens": sum(offline),
                "accepted_per_position": _per_position_counts(offline, kk)}
        agrees = all(res[key] == mine[key] for key in mine)
        same_outputs = sum(o == c for o, c in zip(res["outputs"], cs.continuations, strict=True))
        out["by_k"][str(kk)] = {**{key: v for key, v in res.items() if key != "outputs"}, "offline": mine,
                                "agrees": agrees, "outputs_equal_offline": same_outputs}
        out["agrees"] &= agrees
        if not agrees:
            alone = served_counters(target.path, draft_dir, cs.prompt_ids, budgets, stops, [kk],
                                    max_model_len=engine_len, per_prompt=True)[kk]["per_prompt"]
            out["differences"][str(kk)] = [
                {"index": j, "offline_drafts": len(r[kk]), "offline_accepted": sum(r[kk]),
                 "vllm_drafts": row["num_drafts"], "vllm_accepted": row["num_accepted_tokens"]}
                for j, (r, row) in enumerate(zip(rounds, alone, strict=True))
                if (len(r[kk]), sum(r[kk])) != (row["num_drafts"], row["num_accepted_tokens"])]
    return out


def load_draft(path: str | Path, device: str | torch.device = "cpu") -> PEagleDraft:
    """An exported draft, a training checkpoint (verified) or a run directory (its newest complete
    checkpoint): resolved by `peagle.export.find_draft_dir`, as `peagle export` does."""
    from .export import ExportError, find_draft_dir

    try:
        draft_dir = find_draft_dir(path)
    except ExportError as e:
        raise EvalError(f"--draft {e}") from None
    try:
        return PEagleDraft.from_pretrained(draft_dir, device=device)
    except (OSError, ValueError) as e:
        raise EvalError(f"--draft {draft_dir}: {e}") from None


def _check_outputs(args: argparse.Namespace) -> None:
    """--out must be a usable directory and --json a usable file path (checked before any work)."""
    from .rundir import OutputPathError, check_output_dir, check_output_file

    try:
        if args.out is not None:
            check_output_dir(args.out, "--out")
            if args.json is None:
                check_output_file(Path(args.out) / "eval.json", "--out")
        if args.json is not None:
            check_output_file(args.json, "--json")
    except OutputPathError as e:
        raise EvalError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peagle eval",
        description="Exact offline acceptance length of a P-EAGLE draft (vLLM greedy semantics).")
    p.add_argument("--target", required=True, help="local Hugging Face target model directory")
    p.add_argument("--draft", required=True,
                   help="exported draft, training checkpoint, or run directory (its newest complete checkpoint)")
    p.add_argument("--prompts", required=True, help="JSONL of chats ({'messages': ...}) or {'prompt': ...}")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="K (default: the draft's trained speculative_tokens)")
    p.add_argument("--json", default=None, help="write the results JSON here")
    p.add_argument("--out", default=None, help="write PNG plots (and eval.json unless --json) here")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() batch")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--check-exact", action="store_true",
                   help="also run the literal speculative-decoding loop per prompt and check it agrees (slow)")
    p.add_argument("--engine", choices=("offline", "vllm"), default="offline",
                   help="offline: peagle's exact prediction (no vLLM needed); vllm: also serve target + draft in "
                        "vLLM (parallel drafting, greedy, one engine per K') and print vLLM's own counters beside it")
    p.add_argument("--allow-other-target", action="store_true",
                   help="evaluate even when the draft records another target (shape, tokenizer, weights)")
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """`peagle eval ...`: returns the process exit code (0 ok, 1 bad input, 3 exactness check failed,
    4 vLLM's counters differ from the offline prediction)."""
    args = _parser().parse_args(argv)
    from .data import DataError
    from .target import Target, TargetError
    from .vllm_engine import VLLMError

    try:
        if args.max_new_tokens < 1:
            raise EvalError("--max-new-tokens must be >= 1")
        if args.batch_size < 1:
            raise EvalError("--batch-size must be >= 1")
        _check_outputs(args)
        draft = load_draft(args.draft)
        # the target's states at the draft's own aux layers (in increasing order, as vLLM feeds them)
        target = Target(args.target, device=args.device, trust_remote_code=args.trust_remote_code,
                        aux_layer_ids=draft.config.aux_layer_ids)
        draft = draft.to(target.device)
        json_path = args.json
        if json_path is None and args.out is not None:
            json_path = Path(args.out) / "eval.json"
        vllm_dir = None
        if args.engine == "vllm":
            from .export import find_draft_dir

            vllm_dir = find_draft_dir(args.draft)
        result = evaluate(target, draft, args.prompts, args.max_new_tokens, args.num_speculative_tokens,
                          out_dir=args.out, json_path=json_path, chat_template=args.chat_template,
                          batch_size=args.batch_size, progress=not args.no_progress, vllm_draft_dir=vllm_dir,
                          allow_other_target=args.allow_other_target)
        if vllm_dir is not None and not result.vllm["agrees"]:
            return 4
        if args.check_exact:
            return _check_exact(target, draft, args, result)
    except (EvalError, TargetError, DataError, FileNotFoundError, VLLMError) as e:
        print(f"peagle eval: error: {e}", file=sys.stderr)
        return 1
    return 0


def _check_exact(target: Any, draft: PEagleDraft, args: argparse.Namespace, result: EvalResult) -> int:
    tokenizer = _load_tokenizer(target)
    from .data import load_chat_template

    ids = tokenize_prompts(tokenizer, load_prompts(args.prompts), load_chat_template(args.chat_template))
    stops = stop_token_ids(target, tokenizer)
    ctx = _context_length(target, draft)
    bad = 0
    for p in tqdm(result.prompts, desc="literal loop", disable=args.no_progress):
        i = p["index"]
        budget = min(args.max_new_tokens, ctx - len(ids[i]))
        counts = literal_speculative_decode(target, draft, ids[i], result.num_speculative_tokens, budget,
                                            stop_ids=stops)
        if counts != p["accepted_per_round"]:
            bad += 1
            print(f"prompt {i}: literal loop {counts} != one-pass {p['accepted_per_round']}", file=sys.stderr)
    print(f"literal loop check: {len(result.prompts) - bad}/{len(result.prompts)} prompts agree exactly")
    return 3 if bad else 0
