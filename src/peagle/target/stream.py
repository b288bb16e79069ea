"""Streamed target states: asked from vLLM while training runs, a bounded number of batches ahead.

The offline cache (`peagle.target.cache`) holds every example's states on disk before training starts:
4 × hidden × 2 bytes a token, terabytes for a 70B-class target. `StreamedStates` gets the same states
(the same extraction: `peagle.target.vllm_states.VLLMStates` in-process, or
`peagle.target.vllm_server.ServerStates` for vLLM servers) for the micro-batches about to be trained:

- ``start(schedule)``: ``schedule`` yields, in the order training will consume them, each micro-batch's
  example indices (row by row). A background thread takes the next ones as soon as the staging area has
  room for ``chunk`` of them (a step's micro-batches) and asks the extractor for their states in one call
  (vLLM batches the documents).
- The **staging area** holds at most ``capacity`` micro-batches (requested or ready): per example its
  aux and final states in bf16 — what the cache would hold for them, nothing else. `take` removes a
  micro-batch as training consumes it; ``stats`` records the peak (bytes and micro-batches).
- ``take(packed)``: the next micro-batch's states, assembled exactly as `CachedStates.states` does
  (bf16 values, cast to ``dtype``): training from the stream equals training from a cache written by
  the same engine. The micro-batch must be the schedule's next one (the order is checked).
- ``states(packed)``: any other batch (validation), extracted now through the same engine.
- **Failures.** An extraction that raises is retried ``retries`` times (``extractor.reset()`` first:
  a restarted in-process engine; exponential backoff from ``backoff`` s); then every waiting `take` raises
  :class:`StreamError`, one line naming the engine and the last error. A `take` that gets nothing for
  ``stall_after`` seconds raises it too (a stalled engine). The training loop saves a checkpoint then.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from peagle.target.cache import assemble_states, documents

__all__ = ["BACKOFF_S", "Extractor", "StreamError", "StreamedStates", "example_order"]

BACKOFF_S = 1.0  # the first retry's delay; each further retry doubles it (at most 60 s)


class StreamError(ValueError):
    """The target states could not be had from the engine (after the retries), or it stalled."""


class Extractor(Protocol):
    """What gives target states: ``VLLMStates`` (in-process) or ``ServerStates`` (vLLM servers)."""

    hidden_size: int
    aux_layer_ids: tuple[int, ...]

    def extract(self, token_ids: Sequence[Sequence[int]]) -> list[tuple[Tensor, Tensor]]: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


def example_order(packed: Any) -> tuple[int, ...]:
    """The example indices of a packed micro-batch, row by row (what a schedule yields for it)."""
    return tuple(i for _, _, _, i in documents(packed))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass
class _Entry:
    ids: tuple[int, ...]
    states: dict[int, tuple[Tensor, Tensor]] | None = None
    error: str | None = None
    nbytes: int = 0


@dataclass
class StreamStats:
    """What the stream did: micro-batches served, time training waited, the staging area's peak."""

    micro_batches: int = 0
    examples: int = 0
    tokens: int = 0
    extract_calls: int = 0
    extract_s: float = 0.0
    wait_s: float = 0.0
    retries: int = 0
    sync_calls: int = 0
    staged_bytes: int = 0
    peak_bytes: int = 0
    peak_micro_batches: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "errors"} | {"errors": list(self.errors)}


class StreamedStates:
    """Target states streamed from an extractor into a bounded staging area (see the module docstring).

    ``token_ids(i)``: example i's token ids. ``capacity``: micro-batches staged at most (ready or
    requested). ``chunk``: micro-batches asked for at least per extraction (a step's: the loop takes them
    together, and vLLM batches larger calls better), fewer only at the schedule's end. ``dtype``: what
    `take`/`states` return (default bf16, as stored). ``log``: one-line notices (retries), from the
    background thread.
    """

    streamed = True

    def __init__(self, extractor: Extractor, token_ids: Callable[[int], Sequence[int]], *, capacity: int,
                 chunk: int = 1, retries: int = 3, backoff: float | None = None, stall_after: float = 600.0,
                 dtype: torch.dtype | None = None, name: str = "vLLM",
                 log: Callable[[str], None] | None = None) -> None:
        if capacity < 1 or retries < 0 or stall_after <= 0:
            raise ValueError(f"capacity {capacity} must be >= 1, retries {retries} >= 0, stall_after {stall_after} > 0")
        self.extractor = extractor
        self.token_ids = token_ids
        self.capacity = int(capacity)
        self.chunk = max(1, min(int(chunk), self.capacity))
        self.retries = int(retries)
        self.backoff = float(BACKOFF_S if backoff is None else backoff)
        self.stall_after = float(stall_after)
        self.dtype = dtype
        self.name = name
        self.log = log or (lambda text: None)
        self.hidden_size = int(extractor.hidden_size)
        self.aux_width = len(extractor.aux_layer_ids) * self.hidden_size
        self.stats = StreamStats()
        self._cond = threading.Condition()
        self._engine = threading.Lock()  # one extraction at a time (vLLM's LLM is not thread-safe)
        self._staged: deque[_Entry] = deque()
        self._schedule: Iterator[Sequence[int]] | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._exhausted = False
        self._failure: str | None = None
        self._stalled = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, schedule: Iterator[Sequence[int]]) -> None:
        """Begin requesting the micro-batches of ``schedule`` (each: example indices, row by row)."""
        if self._thread is not None:
            raise RuntimeError("the stream is already started")
        self._schedule = iter(schedule)
        self._thread = threading.Thread(target=self._produce, name="peagle-states-stream", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop requesting, drop the staging area, close the extractor (its engine / connections)."""
        with self._cond:
            self._closed = True
            self._staged.clear()
            self.stats.staged_bytes = 0
            self._cond.notify_all()
        if self._thread is not None:
            # an extraction under way finishes first; a stalled one keeps its (daemon) thread, not waited for
            self._thread.join(timeout=1.0 if self._stalled else 60.0)
        if self._thread is None or not self._thread.is_alive():
            self.extractor.close()

    def __enter__(self) -> StreamedStates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the producer ---------------------------------------------------------------------------

    def _produce(self) -> None:
        try:
            self._produce_all()
        except Exception as e:  # a bug or an unreadable dataset: every waiting `take` says so, at once
            with self._cond:
                self._failure = f"the states stream stopped: {_one_line(e)}"
                for en in self._staged:
                    if en.states is None:
                        en.error = self._failure
                self._cond.notify_all()

    def _produce_all(self) -> None:
        assert self._schedule is not None
        while True:
            with self._cond:
                while not self._closed and self.capacity - len(self._staged) < self.chunk:
                    self._cond.wait()
                if self._closed:
                    return
                free = self.capacity - len(self._staged)
            entries = []
            for _ in range(free):
                ids = next(self._schedule, None)
                if ids is None:
                    break
                entries.append(_Entry(tuple(int(i) for i in ids)))
            with self._cond:
                if not entries:
                    self._exhausted = True
                    self._cond.notify_all()
                    return
                self._staged.extend(entries)
            unique = list(dict.fromkeys(i for e in entries for i in e.ids))
            try:
                got = self._extract([self.token_ids(i) for i in unique])
            except StreamError as e:
                with self._cond:
                    self._failure = str(e)
                    for en in entries:
                        en.error = str(e)
                    self._cond.notify_all()
                return
            by_id = {i: (a.to(torch.bfloat16), f.to(torch.bfloat16)) for i, (a, f) in zip(unique, got, strict=True)}
            with self._cond:
                if self._closed:
                    return
                for en in entries:
                    en.states = {i: by_id[i] for i in en.ids}
                    en.nbytes = sum(a.numel() * a.element_size() + f.numel() * f.element_size()
                                    for a, f in en.states.values())
                    self.stats.staged_bytes += en.nbytes
                s = self.stats
                s.peak_bytes = max(s.peak_bytes, s.staged_bytes)
                s.peak_micro_batches = max(s.peak_micro_batches, sum(e.states is not None for e in self._staged))
                self._cond.notify_all()

    def _extract(self, token_lists: list[Sequence[int]]) -> list[tuple[Tensor, Tensor]]:
        """The extractor's states, retried ``retries`` times (reset first, exponential backoff)."""
        last = ""
        for attempt in range(self.retries + 1):
            if self._closed:
                raise StreamError("the stream was closed")
            t0 = time.perf_counter()
            try:
                with self._engine:
                    got = self.extractor.extract(token_lists)
                if len(got) != len(token_lists):
                    raise StreamError(f"{len(got)} states for {len(token_lists)} sequences")
            except Exception as e:  # any failure of the engine or the transport: bounded retries
                last = _one_line(e)
                self.stats.errors.append(last)
                if attempt == self.retries:
                    break
                delay = min(self.backoff * 2 ** attempt, 60.0)
                self.stats.retries += 1
                self.log(f"target states: {self.name} failed ({last}); retry {attempt + 1}/{self.retries} "
                         f"in {delay:g} s")
                try:
                    with self._engine:
                        self.extractor.reset()
                except Exception as e2:  # the retry reports it
                    self.stats.errors.append(_one_line(e2))
                time.sleep(delay)
                continue
            self.stats.extract_calls += 1
            self.stats.extract_s += time.perf_counter() - t0
            return got
        raise StreamError(f"target states from {self.name} failed {self.retries + 1} time(s) in a row "
                          f"(last: {last})")

    # -- the consumer ---------------------------------------------------------------------------

    def _wait_limit(self) -> float:
        """How long `take` waits: every attempt may take ``stall_after`` s, plus the backoffs between them."""
        backoffs = sum(min(self.backoff * 2 ** a, 60.0) for a in range(self.retries))
        return self.stall_after * (self.retries + 1) + backoffs

    def take(self, packed: Any) -> tuple[Tensor, Tensor]:
        """The states of ``packed``, the schedule's next micro-batch, removed from the staging area."""
        ids = example_order(packed)
        t0 = time.perf_counter()
        limit = self._wait_limit()
        with self._cond:
            while True:
                head = self._staged[0] if self._staged else None
                if head is not None and (head.states is not None or head.error is not None):
                    break
                if head is None and self._failure is not None:
                    raise StreamError(self._failure)
                if head is None and self._exhausted:
                    raise StreamError("the stream's schedule has no more micro-batches (training asked for more)")
                if self._thread is None:
                    raise RuntimeError("the stream is not started")
                left = limit - (time.perf_counter() - t0)
                if left <= 0:
                    self._stalled = True
                    raise StreamError(f"target states from {self.name}: nothing for {limit:.0f} s (the engine "
                                      "stalls; data.stream_timeout bounds each attempt)")
                self._cond.wait(timeout=min(left, 1.0))
            self._staged.popleft()
            self.stats.staged_bytes -= head.nbytes
            self._cond.notify_all()
        self.stats.wait_s += time.perf_counter() - t0
        if head.error is not None:
            raise StreamError(head.error)
        if head.ids != ids:
            raise RuntimeError(f"streamed states out of order: training asked for examples {list(ids)[:8]}, the "
                               f"stream's next micro-batch holds {list(head.ids)[:8]}")
        assert head.states is not None
        self.stats.micro_batches += 1
        self.stats.examples += len(ids)
        self.stats.tokens += sum(a.shape[0] for a, _ in head.states.values())
        states = head.states
        return assemble_states(packed, states.__getitem__, self.aux_width, self.hidden_size,
                               self.dtype or torch.bfloat16, where=f"streamed states from {self.name}")

    def states(self, packed: Any) -> tuple[Tensor, Tensor]:
        """States of a batch outside the schedule (validation), extracted now (bf16-rounded like `take`)."""
        spans = documents(packed)
        ids = packed.input_ids.cpu()
        if self._failure is not None:
            raise StreamError(self._failure)
        got = self._extract([ids[b, p:p + r].tolist() for b, p, r, _ in spans])
        self.stats.sync_calls += 1
        by_pos = {(b, p): (a.to(torch.bfloat16), f.to(torch.bfloat16)) for (b, p, _, _), (a, f) in
                  zip(spans, got, strict=True)}
        B, n = ids.shape
        dtype = self.dtype or torch.bfloat16
        aux = torch.zeros(B, n, self.aux_width, dtype=dtype)
        fin = torch.zeros(B, n, self.hidden_size, dtype=dtype)
        for b, p, r, _ in spans:
            a, f = by_pos[(b, p)]
            aux[b, p:p + r] = a
            fin[b, p:p + r] = f
        return aux, fin
