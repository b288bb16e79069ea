"""`peagle regenerate` against a real `vllm serve` (the module entry point) on 127.0.0.1."""

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

MAX_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(cases, tmp_path_factory):
    """vLLM's OpenAI-compatible server for the llama case's target; stopped by its PID."""
    target = cases["llama-full"].target
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target), "--dtype", "float32",
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "1024", "--seed", "0"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError("vllm serve did not come up in 240 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    from conftest import _prompts

    p = tmp_path_factory.mktemp("regen") / "chats.jsonl"
    recs = []
    for i, q in enumerate(_prompts(24, 7)):
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "old"}]
        if i % 4 == 0:  # multi-turn: the second answer follows the regenerated first one
            msgs += [{"role": "user", "content": "and again"}, {"role": "assistant", "content": "old"}]
        recs.append({"messages": msgs})
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def _regen(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peagle.cli", "regenerate", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)


def _texts(path: Path) -> list[tuple[int, list[str]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["index"], [m["content"] for m in r["messages"] if m["role"] == "assistant"]) for r in rows]


def test_server_equals_in_process_and_resumes(server, cases, chats, tmp_path):
    target = cases["llama-full"].target
    hf = _regen(str(chats), "--out", str(tmp_path / "hf.jsonl"), "--engine", "hf", "--target", str(target),
                "--max-tokens", str(MAX_TOKENS))
    assert hf.returncode == 0, hf.stderr[-2000:]
    served = _regen(str(chats), "--out", str(tmp_path / "served.jsonl"), "--server", server, "--server", server,
                    "--max-tokens", str(MAX_TOKENS), "--concurrency", "4")
    assert served.returncode == 0, served.stderr[-2000:]
    assert "req/s" in served.stdout and "tok/s" in served.stdout
    want = _texts(tmp_path / "hf.jsonl")
    assert _texts(tmp_path / "served.jsonl") == want  # greedy: the same responses, turn by turn
    assert len(want) >= 20

    # killed mid-run (SIGKILL), then rerun: no duplicate, no gap, the same result
    out = tmp_path / "killed.jsonl"
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen([sys.executable, "-m", "peagle.cli", "regenerate", str(chats), "--out", str(out),
                             "--server", server, "--max-tokens", str(MAX_TOKENS), "--concurrency", "1",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not out.exists()
    done_before = partial.read_text().count("\n")
    assert 4 <= done_before < len(want)
    again = _regen(str(chats), "--out", str(out), "--server", server, "--max-tokens", str(MAX_TOKENS))
    assert again.returncode == 0 and "resuming" in again.stdout
    assert _texts(out) == want and not partial.exists()


def test_dead_server_reported(chats, tmp_path):
    port = _free_port()
    res = _regen(str(chats), "--out", str(tmp_path / "x.jsonl"), "--server", f"http://127.0.0.1:{port}",
                 "--retries", "1", timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"no server answered (http://127.0.0.1:{port})" in res.stderr
