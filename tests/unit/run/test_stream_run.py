"""``data.states: stream`` through the training loop, with an extractor that answers from a cache's states
(no vLLM): the streamed run trains exactly the cache run (same batches, bitwise the same losses and draft);
an extractor that keeps failing stops the run with one line and a checkpoint, and ``--resume auto`` with a
working one continues exactly; a transient failure is retried and changes nothing."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from stream_helpers import stream_config, train_records

import peagle.run.build as build_mod
import peagle.target.stream as stream_mod
from peagle.cli import main
from peagle.config.training import load_config
from peagle.data import load_prepared, prepare
from peagle.target.cache import CachedStates, write_cache
from peagle.target.hf import Target, embedding_rows

CHATS = [
    [{"role": "user", "content": "count from 3 to 9"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"}],
    [{"role": "user", "content": "what is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19"},
     {"role": "user", "content": "and 3 + 4?"}, {"role": "assistant", "content": "7"}],
    [{"role": "user", "content": "sort: pear, apple, fig"}, {"role": "assistant", "content": "apple, fig, pear"}],
    [{"role": "user", "content": "capital of France?"}, {"role": "assistant", "content": "Paris, on the Seine."}],
]
STEPS = 6


@pytest.fixture(scope="module")
def setup(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream_run")
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 5))
    prepare(chats, llama_dir, root / "prep", max_length=64, draft_vocab_size=128,
            vocab_size=embedding_rows(llama_dir), progress=False)
    write_cache(Target(llama_dir, device="cpu"), root / "prep", root / "cache", shard_size=8, progress=False)
    return {"root": root, "data": root / "prep", "cache": root / "cache", "target": llama_dir}


class CacheExtractor:
    """Answers each token sequence with the cached states of the example holding those tokens."""

    fail_validation = False  # requests made outside the stream's thread (validation's) fail

    def __init__(self, setup: dict[str, Path], fail_calls: set[int] = frozenset()) -> None:
        self.cache = CachedStates(setup["cache"], dtype=torch.float32)
        data = load_prepared(setup["data"])
        self.by_tokens = {tuple(data[i]["input_ids"]): i for i in range(len(data))}
        self.hidden_size = self.cache.hidden_size
        self.aux_layer_ids = self.cache.aux_layer_ids
        self.calls, self.fail_calls, self.resets = 0, set(fail_calls), 0

    def extract(self, token_ids: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.calls += 1
        which = [self.by_tokens[tuple(int(t) for t in ids)] for ids in token_ids]
        sync = threading.current_thread().name != "peagle-states-stream"
        if self.calls in self.fail_calls or (self.fail_validation and sync):
            raise ConnectionError("server 127.0.0.1:1 refused the connection")
        return [self.cache.get(i) for i in which]

    def reset(self) -> None:
        self.resets += 1

    def close(self) -> None:
        pass


def _config(setup: dict[str, Path], out: Path, eval_every: int = 3, **data: Any) -> Path:
    return stream_config(out, setup["data"], setup["target"], max_length=64, steps=STEPS,
                         data={"val_fraction": 0.2, **data}, train={"save_every": 2, "eval_every": eval_every})



def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


FAILS: list[set[int]] = []  # the failing calls of the next extractors built (one set per run, in order)


@pytest.fixture
def streamed(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> list[CacheExtractor]:
    """Every streamed run's extractor answers from the cache (the list: one per run built, in order)."""
    made: list[CacheExtractor] = []
    FAILS.clear()

    def make(cfg: Any, aux: Any) -> CacheExtractor:
        ex = CacheExtractor(setup, FAILS.pop(0) if FAILS else set())
        made.append(ex)
        return ex

    monkeypatch.setattr(build_mod, "_stream_extractor", make)
    monkeypatch.setattr(build_mod, "_check_stream", lambda cfg: None)
    monkeypatch.setattr(stream_mod, "BACKOFF_S", 0.01)
    monkeypatch.setattr(CacheExtractor, "fail_validation", False)
    return made


def test_stream_trains_exactly_the_cache_run(setup, streamed, tmp_path, capsys):
    assert main(["train", str(_config(setup, tmp_path / "cache_run", cache=str(setup["cache"])))]) == 0
    assert main(["train", str(_config(setup, tmp_path / "stream_run", states="stream"))]) == 0
    out = capsys.readouterr().out
    assert "data.states stream: target states from" in out and "staging area peak" in out
    a, b = train_records(tmp_path / "cache_run"), train_records(tmp_path / "stream_run")
    assert len(a[0]) == STEPS and a == b  # same batches, bitwise the same losses (train and validation)
    wa, wb = _weights(tmp_path / "cache_run"), _weights(tmp_path / "stream_run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ex = streamed[0]
    assert ex.calls >= 2 and ex.resets == 0
    line = next(x for x in out.splitlines() if x.startswith("streamed target states"))
    assert f"{STEPS * 2} micro-batches" in line


def test_failure_checkpoint_then_exact_resume(setup, streamed, tmp_path, capsys):
    # validation after step 4: the engine dies at its 4th call (step 4's states, one step ahead) for good
    assert main(["train", str(_config(setup, tmp_path / "ref", eval_every=4, cache=str(setup["cache"])))]) == 0
    FAILS.append(set(range(4, 100)))
    cfg = _config(setup, tmp_path / "run", eval_every=4, states="stream", stream_retries=2, stream_prefetch=1)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peagle: error: target states from")
    assert "failed 3 time(s) in a row" in err and "refused the connection" in err
    assert "--resume auto" in err and "checkpoint" in err
    first = streamed[0]
    assert first.resets == 2
    ckpts = sorted(p.name for p in (tmp_path / "run").glob("step-*"))
    assert ckpts, err
    stopped = int(ckpts[-1].removeprefix("step-"))
    assert stopped == 3 and "at step 3" in err and "before step 4/6" in err
    assert main(["train", str(cfg), "--resume", "auto"]) == 0
    ref, got = train_records(tmp_path / "ref"), train_records(tmp_path / "run")
    assert got == ref  # every step once (the resumed ones exactly as uninterrupted), validation too
    wa, wb = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_transient_failure_is_retried(setup, streamed, tmp_path, capsys):
    FAILS.append({3})
    assert main(["train", str(_config(setup, tmp_path / "ref", cache=str(setup["cache"])))]) == 0
    assert main(["train", str(_config(setup, tmp_path / "run", states="stream"))]) == 0
    assert "retry 1/3" in capsys.readouterr().out
    assert streamed[0].resets == 1
    assert train_records(tmp_path / "ref") == train_records(tmp_path / "run")


def test_in_process_stream_without_vllm_is_one_line(setup, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["train", str(_config(setup, tmp_path / "novllm", states="stream"))]) == 1
    err = capsys.readouterr().err.strip()
    assert "runs vLLM in-process, and vLLM is not installed" in err and "\n" not in err


def test_each_rank_streams_its_own_share_in_the_loops_order(setup, tmp_path):
    """Under torchrun rank r's schedule lists exactly its micro-batches of every step (``step_micro_rows``),
    so the ranks' schedules together cover each step's rows once; from a resumed state it starts there."""
    from peagle.run.loader import TrainData
    from peagle.store.checkpoint import TrainState

    cfg = load_config(_config(setup, tmp_path / "ranks", states="stream"))
    cfg.train.micro_batch_size, cfg.train.grad_accum = 1, 2
    data = TrainData(cfg, load_prepared(setup["data"]), rows_per_step=4)  # 2 ranks × 2 micro-batches × 1 row
    total = 5
    scheds = [list(data.stream_schedule(TrainState(), total, rank, 2)) for rank in (0, 1)]
    steps = list(data.positions(TrainState(), total))
    assert len(scheds[0]) == len(scheds[1]) == 2 * total
    for s, (epoch, row) in enumerate(steps):
        rows = data.epoch_rows(epoch)[row:row + 4]
        got = [scheds[r][2 * s + j] for j in (0, 1) for r in (0, 1)]  # micro-batch j of rank r: rows j·W + r
        assert got == [list(x) for x in rows]
    state = TrainState(step=2, epoch=steps[2][0], row_in_epoch=steps[2][1])
    schedule = data.stream_schedule(state, total, 1, 2)
    state.step, state.row_in_epoch = 4, 0  # the loop moving on does not move a schedule already made
    assert list(schedule) == scheds[1][4:]


def test_a_failure_in_validation_saves_the_step_and_resumes(setup, streamed, tmp_path, capsys, monkeypatch):
    """The validation after step 3 cannot get its states: a checkpoint at step 3 and one line; resumed, the
    remaining steps equal the uninterrupted run's (the lost validation at step 3 aside)."""
    assert main(["train", str(_config(setup, tmp_path / "ref", cache=str(setup["cache"])))]) == 0
    monkeypatch.setattr(CacheExtractor, "fail_validation", True)
    cfg = _config(setup, tmp_path / "run", states="stream", stream_retries=1)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "failed 2 time(s) in a row" in err and "before step 4/6" in err
    assert "checkpoint" in err and "at step 3" in err
    monkeypatch.setattr(CacheExtractor, "fail_validation", False)
    assert main(["train", str(cfg), "--resume", "auto"]) == 0
    (ref_train, ref_val), (got_train, got_val) = train_records(tmp_path / "ref"), train_records(tmp_path / "run")
    assert got_train == ref_train and got_val == [v for v in ref_val if v["step"] != 3]


def test_a_failure_in_the_final_validation(setup, streamed, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(CacheExtractor, "fail_validation", True)
    cfg = _config(setup, tmp_path / "run", eval_every=0, states="stream", stream_retries=0)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "in the final validation; all 6 steps are trained and saved" in err
    assert not (tmp_path / "run" / "final").exists() and (tmp_path / "run" / "step-00000006").is_dir()
    monkeypatch.setattr(CacheExtractor, "fail_validation", False)
    assert main(["train", str(cfg), "--resume", "auto"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert [v["step"] for v in train_records(tmp_path / "run")[1]] == [6]
