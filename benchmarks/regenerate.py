"""Regeneration throughput: `peagle regenerate` through a local vLLM server vs in-process HF, one run.

Run with a Python that has vLLM (e.g. .venv-vllm/bin/python, built by `make test-vllm`):

    .venv-vllm/bin/python benchmarks/regenerate.py --target ~/.cache/peagle/demo/target --records 2000

Both engines regenerate the same chats (the demo corpus' first N training prompts), greedy, with the
same max_tokens; the server is `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (fp32,
stopped by its PID at the end). Prints requests/s and tokens/s of each and the ratio, and whether the
two outputs agree record by record.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(target: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target),
                             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
                             "--seed", "0"], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"vllm server exited ({proc.returncode}); see {log}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2)
            return proc, url
        except OSError:
            time.sleep(1)
    raise SystemExit("vllm server did not start in 300 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, type=Path)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128, help="HF engine prompts per generate() batch")
    args = p.parse_args()

    from peagle.demo.corpus import generate_corpus, write_jsonl
    from peagle.regenerate import HFEngine, Sampling, ServerEngine, regenerate

    work = Path(tempfile.mkdtemp(prefix="peagle-regen-bench-"))
    train, _ = generate_corpus(0, args.records, 1)
    src = write_jsonl(train[: args.records], work / "chats.jsonl")
    sampling = Sampling(max_tokens=args.max_tokens)
    results = {}
    hf = regenerate(src, work / "hf.jsonl", HFEngine(args.target, batch_size=args.batch_size), sampling=sampling,
                    progress=False)
    results["hf in-process"] = hf
    proc, url = _serve(args.target, work / "server.log")
    try:
        served = regenerate(src, work / "served.jsonl", ServerEngine([url], concurrency=args.concurrency),
                            sampling=sampling, progress=False)
        results["vllm server"] = served
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    def answers(path: Path) -> list:
        return [[m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
                for line in path.read_text().splitlines()]

    same = sum(a == b for a, b in zip(answers(work / "hf.jsonl"), answers(work / "served.jsonl"), strict=False))
    print(f"\n{'engine':<16} {'records':>8} {'req/s':>8} {'tok/s':>8} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<16} {r['records']:>8} {r['requests_per_s']:>8.1f} {r['tokens_per_s']:>8.0f} "
              f"{r['seconds']:>8.1f}")
    ratio = results["vllm server"]["tokens_per_s"] / results["hf in-process"]["tokens_per_s"]
    print(f"vllm server / hf in-process tokens/s: {ratio:.2f}x; identical records: {same}/{args.records}")
    print(f"(cpu cores: {os.cpu_count()}; outputs in {work})")


if __name__ == "__main__":
    main()
