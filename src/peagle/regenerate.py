"""`peagle regenerate`: the target writes the assistant turns the draft is trained on.

P-EAGLE/EAGLE drafts learn the target's own distribution, so training chats get their assistant turns
rewritten by the target (the demo measures what that is worth). The target runs where users already
run it: behind OpenAI-compatible servers (`vllm serve`, SGLang; several ``--server`` URLs share the
work, each request goes to the next server, a failing one is retried with backoff on the others), or
in-process (``--engine vllm`` or ``hf``).

Each assistant turn is regenerated from the regenerated history before it (a turn that calls tools is
kept as written: the tool results that follow answer that call). Output: one JSONL line per record,
``{"index", "source", "messages", "tools"?, "finish_reasons", "truncated"}``. While running, finished
records are appended to ``OUT.partial`` (keyed by record index; a rerun skips them, a killed run loses
only the records in flight); when every record is done, ``OUT`` is written in input order (records
with a truncated turn left out with ``--drop-truncated``; records with an empty response always) and
the partial file removed.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from peagle.util.files import atomic_file

__all__ = ["Completion", "HFEngine", "RegenError", "ServerEngine", "VLLMEngine", "check_sampling", "make_engine",
           "regenerate"]


class RegenError(ValueError):
    """Regeneration cannot run as asked (no server answers, bad output path, unknown engine)."""


@dataclass
class Sampling:
    """What every request asks for (greedy by default, as the evaluation's continuations are)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512


@dataclass
class Completion:
    """One regenerated assistant turn: its text, why it ended ("stop" | "length"), its token count."""

    text: str
    finish_reason: str
    tokens: int
    reasoning: str | None = None


Request = tuple[list[dict[str, Any]], Any]  # (messages so far, tools)


# ------------------------------------------------------------------------------------------------
# Engines: complete(requests, sampling, length_hints) -> completions, same order. length_hints: each turn's
# original length in characters, an estimate of the new one; only the HF engine's static batches use it
# (servers and vLLM batch continuously).


class ServerEngine:
    """OpenAI-compatible chat completions over HTTP: bounded concurrency, round-robin, retries.

    A request that fails to connect (or gets 429/5xx) is retried on the next server after an
    exponential backoff (0.5 s, 1 s, 2 s, …), `retries` times in all; when every try failed to reach a
    server the error names the servers and the last reason.
    """

    def __init__(self, servers: Sequence[str], model: str | None = None, *, concurrency: int = 16,
                 retries: int = 4, timeout: float = 600.0) -> None:
        if not servers:
            raise RegenError("--server: give at least one URL (e.g. http://127.0.0.1:8000)")
        self.servers = [s.rstrip("/") for s in servers]
        self.concurrency, self.retries, self.timeout = concurrency, retries, timeout
        self._next = 0
        self._lock = threading.Lock()
        self.model = model or self._served_model()

    def _post(self, url: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())

    def _call(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        last = ""
        for attempt in range(self.retries + 1):
            with self._lock:
                server = self.servers[self._next % len(self.servers)]
                self._next += 1
            try:
                return self._post(server + path, body)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code not in (408, 429) and e.code < 500:
                    raise RegenError(f"{server}{path}: HTTP {e.code}: {detail}") from None
                last = f"{server}: HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{server}: {reason}"
            if attempt < self.retries:
                time.sleep(0.5 * 2**attempt)
        raise RegenError(f"no server answered ({', '.join(self.servers)}) after {self.retries + 1} tries; "
                         f"last: {last}. Is `python -m vllm.entrypoints.openai.api_server` (or SGLang) running?")

    def _served_model(self) -> str:
        models = self._call("/v1/models", None).get("data") or []
        if not models:
            raise RegenError(f"{self.servers[0]}/v1/models lists no model; pass --model")
        return str(models[0]["id"])

    def _one(self, req: Request, s: Sampling) -> Completion:
        messages, tools = req
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": s.temperature,
                                "top_p": s.top_p, "max_tokens": s.max_tokens}
        if tools:
            body["tools"] = tools
        out = self._call("/v1/chat/completions", body)
        choice = out["choices"][0]
        msg = choice.get("message") or {}
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        tokens = int((out.get("usage") or {}).get("completion_tokens") or 0)
        return Completion(msg.get("content") or "", choice.get("finish_reason") or "stop", tokens, reasoning)

    def complete(self, requests: Sequence[Request], sampling: Sampling,
                 length_hints: Sequence[int] | None = None) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))


class HFEngine:
    """In-process Hugging Face generation (KV cache, left-padded batches); greedy unless temperature > 0."""

    def __init__(self, target: str | Path, *, batch_size: int = 64, device: str | None = None,
                 trust_remote_code: bool = False) -> None:
        from peagle.target.hf import Target

        self.target = Target(target, device=device, trust_remote_code=trust_remote_code)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.target.path), trust_remote_code=trust_remote_code)
        self.batch_size = batch_size
        self.concurrency = batch_size

    def complete(self, requests: Sequence[Request], sampling: Sampling,
                 length_hints: Sequence[int] | None = None) -> list[Completion]:
        from peagle.eval.continuations import greedy_generate
        from peagle.eval.prompts import stop_token_ids, tokenize_prompts

        tok = self.tokenizer
        ids = tokenize_prompts(tok, [{"messages": m, "tools": t} for m, t in requests])
        stops = stop_token_ids(self.target, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
        gens = greedy_generate(self.target.model, ids, [sampling.max_tokens] * len(ids), stops, pad,
                               self.batch_size, temperature=sampling.temperature, top_p=sampling.top_p,
                               length_hints=length_hints)
        out = []
        for g in gens:
            body = g.tokens[:-1] if g.stop_reason == "eos" else g.tokens
            out.append(Completion(tok.decode(body, skip_special_tokens=True),
                                  "stop" if g.stop_reason == "eos" else "length", len(g.tokens)))
        return out


class VLLMEngine:
    """In-process vLLM (``vllm.LLM.chat``), tensor/pipeline parallel sizes passed through; ``progress`` shows
    vLLM's own bar (prompts done, token rates) inside each chunk of requests, which can hold every record."""

    def __init__(self, target: str | Path, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 dtype: str = "auto", max_model_len: int | None = None, progress: bool = False) -> None:
        import torch

        from peagle.target.vllm_engine import VLLMError, import_llm

        try:
            LLM = import_llm()  # noqa: N806 (a class)
        except VLLMError as e:
            raise RegenError(str(e)) from None
        self.llm = LLM(model=str(target), tensor_parallel_size=tensor_parallel_size,
                       pipeline_parallel_size=pipeline_parallel_size, dtype=dtype, max_model_len=max_model_len,
                       enforce_eager=not torch.cuda.is_available(), seed=0)
        self.concurrency = 256
        self.progress = progress

    def complete(self, requests: Sequence[Request], sampling: Sampling,
                 length_hints: Sequence[int] | None = None) -> list[Completion]:
        from vllm import SamplingParams

        sp = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens)
        tools = [t for _, t in requests]
        outs = self.llm.chat([m for m, _ in requests], sp, use_tqdm=self.progress,
                             tools=tools[0] if tools and all(t == tools[0] for t in tools) else None)
        return [Completion(o.outputs[0].text, o.outputs[0].finish_reason or "stop", len(o.outputs[0].token_ids))
                for o in outs]


# ------------------------------------------------------------------------------------------------
# The driver


@dataclass
class _Chat:
    """A record being regenerated turn by turn."""

    index: int
    source: str
    messages: list[dict[str, Any]]
    tools: Any
    done: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    tokens: int = 0
    pos: int = 0
    empty: bool = False

    def next_request(self) -> Request | None:
        """History up to the next assistant turn to regenerate (copying the others), or None when done."""
        while self.pos < len(self.messages):
            m = self.messages[self.pos]
            if m["role"] == "assistant" and not m.get("tool_calls"):
                return list(self.done), self.tools
            self.done.append(m)
            self.pos += 1
        return None

    def length_hint(self) -> int:
        """Characters of the turn being regenerated (its new length is likely alike)."""
        return len(self.messages[self.pos].get("content") or "")

    def accept(self, c: Completion) -> None:
        old = self.messages[self.pos]
        new = {k: v for k, v in old.items() if k not in ("content", "reasoning_content", "reasoning")}
        new["content"] = c.text
        if c.reasoning:
            new["reasoning_content"] = c.reasoning
        self.done.append(new)
        self.reasons.append(c.finish_reason)
        self.tokens += c.tokens
        self.empty |= not c.text.strip()
        self.pos += 1

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "source": self.source, "messages": self.done}
        if self.tools:
            out["tools"] = self.tools
        return {**out, "finish_reasons": self.reasons, "truncated": "length" in self.reasons, "empty": self.empty}


def _read_partial(path: Path) -> dict[int, dict[str, Any]]:
    """Finished records of an interrupted run; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    if cut < len(raw):
        with open(path, "r+b") as f:
            f.truncate(cut)
    done = {}
    for line in raw[:cut].decode().splitlines():
        if line.strip():
            rec = json.loads(line)
            done[int(rec["index"])] = rec
    return done


def regenerate(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    engine: Any,
    *,
    sampling: Sampling | None = None,
    drop_truncated: bool = False,
    split: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Regenerate every assistant turn of the chats in `inputs` with `engine`; write `out` (JSONL).

    Resumes from ``out.partial``; returns the summary (records, turns, tokens, finish reasons, dropped,
    requests/s, tokens/s) that is also printed.
    """
    from peagle.data.records import read_records

    sampling = sampling or Sampling()
    out = Path(out)
    if out.is_dir():
        raise RegenError(f"--out {out} is a directory; expected a .jsonl file path")
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not partial.exists():
        raise RegenError(f"--out {out} already exists (a finished regeneration?); choose another path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    records = list(read_records(inputs, split=split, limit=limit))
    done = _read_partial(partial)
    todo = [_Chat(i, f"{r.source}:{r.line}", r.messages, r.tools) for i, r in enumerate(records) if i not in done]
    if done:
        log(f"peagle regenerate: resuming: {len(done)} of {len(records)} records already done in {partial}")
    chunk = max(1, 4 * int(getattr(engine, "concurrency", 16)))
    t0 = time.perf_counter()
    requests = tokens = 0
    bar = tqdm(total=len(records), initial=len(done), desc="regenerate", unit="rec", disable=not progress)
    with open(partial, "a") as f:
        for start in range(0, len(todo), chunk):
            active = todo[start:start + chunk]
            while True:
                pending = [(c, r) for c in active if (r := c.next_request()) is not None]
                if not pending:
                    break
                comps = engine.complete([r for _, r in pending], sampling,
                                        length_hints=[c.length_hint() for c, _ in pending])
                for c, comp in zip([c for c, _ in pending], comps, strict=True):
                    c.accept(comp)
                requests += len(pending)
            for c in active:
                rec = c.record()
                tokens += c.tokens
                done[c.index] = rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(active))
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{requests / dt:.1f} req/s, {tokens / dt:.0f} tok/s")
    bar.close()
    elapsed = time.perf_counter() - t0
    reasons = Counter(r for rec in done.values() for r in rec["finish_reasons"])
    dropped = Counter()

    # fsync'ed before the partial file (the only other copy of the records) is removed
    with atomic_file(out, fsync=True) as tmp, open(tmp, "w") as f:
        for i in range(len(records)):
            rec = done[i]
            if rec["empty"]:
                dropped["empty response"] += 1
            elif rec["truncated"] and drop_truncated:
                dropped["truncated"] += 1
            else:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    partial.unlink()
    summary = {
        "records": len(records), "written": len(records) - sum(dropped.values()), "dropped": dict(dropped),
        "truncated": sum(1 for r in done.values() if r["truncated"]),
        "turns": sum(len(r["finish_reasons"]) for r in done.values()), "finish_reasons": dict(reasons),
        "requests_this_run": requests, "tokens_this_run": tokens, "seconds": round(elapsed, 3),
        "requests_per_s": requests / elapsed if elapsed > 0 else float("nan"),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"), "out": str(out),
    }
    log(f"peagle regenerate: {summary['written']} of {len(records)} records -> {out} "
        f"({summary['turns']} turns; finish {dict(reasons)}; truncated {summary['truncated']}"
        f"{'' if not dropped else '; dropped ' + str(dict(dropped))}); this run {requests} requests, {tokens} "
        f"tokens in {elapsed:.1f} s = {summary['requests_per_s']:.1f} req/s, {summary['tokens_per_s']:.0f} tok/s")
    return summary


def make_engine(engine: str | None, *, servers: Sequence[str] = (), model: str | None = None,
                target: str | None = None, concurrency: int = 16, retries: int = 4, timeout: float = 600.0,
                batch_size: int = 64, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                progress: bool = False) -> Any:
    """The engine ``peagle regenerate`` uses: "server" (default with servers), or in-process "vllm" / "hf"
    on ``target``; a :class:`RegenError` names what is missing."""
    engine = engine or ("server" if servers else None)
    if engine is None:
        raise RegenError("give --server URL (OpenAI-compatible), or --engine vllm|hf with --target")
    if engine != "server" and not target:
        raise RegenError(f"--engine {engine} needs --target")
    if engine == "server":
        return ServerEngine(list(servers), model, concurrency=concurrency, retries=retries, timeout=timeout)
    if engine == "hf":
        return HFEngine(target, batch_size=batch_size)
    return VLLMEngine(target, tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                      progress=progress)


def check_sampling(sampling: Sampling, concurrency: int = 1) -> None:
    """Refuse sampling settings no engine can honour (one-line :class:`RegenError`)."""
    if sampling.max_tokens < 1 or concurrency < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise RegenError("--max-tokens and --concurrency must be >= 1, --temperature >= 0, 0 < --top-p <= 1")
