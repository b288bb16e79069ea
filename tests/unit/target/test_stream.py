"""peagle.target.stream: the prefetching, bounded staging area, order check, retries and stall detection of
streamed target states, with a fake extractor (no model, no vLLM)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import peagle.target.stream as stream_mod
from peagle.data import collate
from peagle.target.stream import StreamedStates, StreamError, example_order

H = 4
EXAMPLES = [{"input_ids": [10 + i] * (3 + i % 4), "loss_mask": [0] + [1] * (2 + i % 4)} for i in range(12)]


class Fake:
    """States that are a function of the tokens (aux: token id, final: −token id), with failure switches."""

    hidden_size = H
    aux_layer_ids = (1, 2, 3)

    def __init__(self, fail_calls: set[int] = frozenset(), hang_from: int | None = None) -> None:
        self.calls = 0
        self.resets = 0
        self.closed = False
        self.fail_calls, self.hang_from = set(fail_calls), hang_from
        self.release = threading.Event()
        self.sizes: list[int] = []

    def extract(self, token_ids):
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("engine died\nsecond line")
        if self.hang_from is not None and self.calls >= self.hang_from:
            self.release.wait(30)
        self.sizes.append(len(token_ids))
        out = []
        for ids in token_ids:
            t = torch.tensor(ids, dtype=torch.float32)[:, None]
            out.append((t.expand(-1, 3 * H).clone(), (-t).expand(-1, H).clone()))
        return out

    def reset(self) -> None:
        self.resets += 1

    def close(self) -> None:
        self.closed = True


def _want(packed):
    ids = packed.input_ids.float()
    live = (packed.document_ids >= 0).float()[..., None]
    return (ids[..., None] * live).expand(-1, -1, 3 * H), (-ids[..., None] * live).expand(-1, -1, H)


SCHEDULE = [[[0, 1], [2]], [[3], [4, 5]], [[6, 7, 8]], [[9], [10]], [[11]]]  # micro-batches of packed rows


def _stream(fake: Fake, **kw) -> StreamedStates:
    kw.setdefault("backoff", 0.01)
    s = StreamedStates(fake, lambda i: EXAMPLES[i]["input_ids"], dtype=torch.float32, **kw)
    s.start(iter([[i for r in rows for i in r] for rows in SCHEDULE]))
    return s


def test_take_in_order_bounded_and_equal_to_the_tokens_states():
    fake = Fake()
    with _stream(fake, capacity=2) as s:
        for rows in SCHEDULE:
            packed = collate(EXAMPLES, rows, 16)
            time.sleep(0.05)  # let the producer fill the staging area
            assert len(s._staged) <= 2
            aux, fin = s.take(packed)
            wa, wf = _want(packed)
            assert torch.equal(aux, wa) and torch.equal(fin, wf)
        st = s.stats
        assert st.micro_batches == len(SCHEDULE) and st.examples == 12
        assert st.tokens == sum(len(e["input_ids"]) for e in EXAMPLES)
        assert 1 <= st.peak_micro_batches <= 2 and st.staged_bytes == 0
        # the peak is what the two largest consecutive micro-batches' bf16 states take, never more
        per_token = (3 * H + H) * 2
        sizes = [sum(len(EXAMPLES[i]["input_ids"]) for r in rows for i in r) * per_token for rows in SCHEDULE]
        assert 0 < st.peak_bytes <= max(a + b for a, b in zip(sizes, sizes[1:], strict=False))
        with pytest.raises(StreamError, match="no more micro-batches"):
            s.take(collate(EXAMPLES, [[0]], 16))
    assert fake.closed
    counts = [sum(len(r) for r in rows) for rows in SCHEDULE]
    assert max(fake.sizes) <= max(a + b for a, b in zip(counts, counts[1:], strict=False))  # two micro-batches a call


def test_order_is_checked():
    with _stream(Fake(), capacity=2) as s, pytest.raises(RuntimeError, match="out of order"):
        s.take(collate(EXAMPLES, SCHEDULE[1], 16))


def test_sync_states_for_batches_outside_the_schedule():
    fake = Fake()
    with _stream(fake, capacity=1) as s:
        packed = collate(EXAMPLES, [[11, 3], [5]], 16)
        aux, fin = s.states(packed)
        wa, wf = _want(packed)
        assert torch.equal(aux, wa) and torch.equal(fin, wf)
        assert s.stats.sync_calls == 1
        for rows in SCHEDULE:  # the schedule is untouched
            s.take(collate(EXAMPLES, rows, 16))


def test_values_are_rounded_to_bf16_like_the_cache():
    class Odd(Fake):
        def extract(self, token_ids):
            return [(a + 1 / 3, f + 1 / 3) for a, f in super().extract(token_ids)]

    with _stream(Odd(), capacity=1) as s:
        packed = collate(EXAMPLES, SCHEDULE[0], 16)
        aux, _ = s.take(packed)
        assert aux.dtype == torch.float32
        assert torch.equal(aux, aux.to(torch.bfloat16).float())


def test_a_transient_failure_is_retried_after_a_reset():
    fake = Fake(fail_calls={2})
    logs = []
    with _stream(fake, capacity=1, retries=2, log=logs.append) as s:
        for rows in SCHEDULE:
            s.take(collate(EXAMPLES, rows, 16))
        assert s.stats.retries == 1 and fake.resets == 1
    assert len(logs) == 1 and "retry 1/2" in logs[0] and "engine died" in logs[0] and "\n" not in logs[0]


def test_a_persistent_failure_is_one_line_after_the_retries():
    fake = Fake(fail_calls={2, 3, 4, 5})
    with _stream(fake, capacity=1, retries=2) as s:
        s.take(collate(EXAMPLES, SCHEDULE[0], 16))
        with pytest.raises(StreamError) as e:
            s.take(collate(EXAMPLES, SCHEDULE[1], 16))
        msg = str(e.value)
        assert "failed 3 time(s) in a row" in msg and "engine died second line" in msg and "\n" not in msg
        assert fake.calls == 4 and fake.resets == 2
        with pytest.raises(StreamError):  # and it stays failed
            s.states(collate(EXAMPLES, [[0]], 16))


def test_a_stalled_engine_is_an_error(monkeypatch):
    fake = Fake(hang_from=2)
    s = _stream(fake, capacity=1, retries=0, stall_after=0.3)
    try:
        s.take(collate(EXAMPLES, SCHEDULE[0], 16))
        t0 = time.perf_counter()
        with pytest.raises(StreamError, match="nothing for"):
            s.take(collate(EXAMPLES, SCHEDULE[1], 16))
        assert time.perf_counter() - t0 < 3
    finally:
        fake.release.set()
        s.close()


def test_example_order_and_argument_checks():
    assert example_order(collate(EXAMPLES, [[3, 1], [7]], 16)) == (3, 1, 7)
    with pytest.raises(ValueError):
        StreamedStates(Fake(), lambda i: [], capacity=0)
    assert stream_mod.BACKOFF_S > 0


def test_a_broken_schedule_is_an_error_not_a_hang():
    def schedule():
        yield [0, 1, 2]
        raise OSError("dataset file vanished")

    s = StreamedStates(Fake(), lambda i: EXAMPLES[i]["input_ids"], capacity=1, stall_after=30)
    s.start(schedule())
    try:
        s.take(collate(EXAMPLES, [[0, 1], [2]], 16))
        t0 = time.perf_counter()
        with pytest.raises(StreamError, match="stream stopped: OSError: dataset file vanished"):
            s.take(collate(EXAMPLES, [[3]], 16))
        assert time.perf_counter() - t0 < 5
    finally:
        s.close()
