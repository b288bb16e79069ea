"""Target states from running vLLM servers (OpenAI-compatible, started with the extraction method + connector).

A server started as `server_args` says (``--speculative-config`` with ``extract_hidden_states`` and the
layer ids peagle needs, ``--kv-transfer-config`` with ``ExampleHiddenStatesConnector`` writing to a
directory) answers a ``/v1/completions`` request whose prompt is a list of token ids with
``max_tokens: 1`` by writing the prompt's states to ``<dir>/<request id>.safetensors`` and returning
that path in the response's ``kv_transfer_params.hidden_states_path``. `ServerStates` sends each
document as one such request (round-robin over the servers, ``concurrency`` in flight), reads the file
the way vLLM's ``load_hidden_states`` does (a shared lock on ``<path>.lock`` waits for the writer) and
deletes it. So the directory must be visible to the trainer at the same path (one machine, or a shared
mount). vLLM itself is not needed on the trainer's side. docs/large-targets.md has the server command.
"""

from __future__ import annotations

import fcntl
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peagle.target.vllm_engine import VLLMError
from peagle.target.vllm_states import CONNECTOR, CONNECTOR_MODULE, VLLMStates

__all__ = ["ServerStates", "server_args"]


def server_args(target: str | Path, extract_ids: Sequence[int], storage: str | Path, *, cpu: bool = False,
                port: int = 8000, host: str = "127.0.0.1", max_model_len: int | None = None,
                dtype: str | None = None, tensor_parallel_size: int = 1) -> list[str]:
    """The arguments of ``python -m vllm.entrypoints.openai.api_server`` (or ``vllm serve``, without
    ``--model``) for a server `ServerStates` can use. ``cpu``: peagle's host-memory connector
    (`peagle.target.vllm_hs_connector`, needs peagle importable by the server) and eager mode."""
    spec = {"method": "extract_hidden_states", "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [int(i) for i in extract_ids]}}}
    kv: dict[str, Any] = {"kv_connector": CONNECTOR, "kv_role": "kv_producer",
                          "kv_connector_extra_config": {"shared_storage_path": str(storage)}}
    if cpu:
        kv["kv_connector_module_path"] = CONNECTOR_MODULE
    args = ["--model", str(target), "--host", host, "--port", str(port),
            "--speculative-config", json.dumps(spec, separators=(",", ":")),
            "--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]
    if tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    if dtype is not None:
        args += ["--dtype", dtype]
    if cpu:
        args += ["--enforce-eager"]
    return args


def _read_states(path: str) -> dict[str, Tensor]:
    """vLLM's ``load_hidden_states`` without vLLM: wait for the writer's lock, load, delete both files."""
    from safetensors.torch import load_file

    lock = path + ".lock"
    try:
        with open(lock) as lf:
            fcntl.flock(lf, fcntl.LOCK_SH)  # sleeps until the writer releases its exclusive lock
            data = load_file(path, device="cpu")
    except FileNotFoundError:
        data = load_file(path, device="cpu")  # no lock file: the write finished and the lock was removed
    for p in (lock, path):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    return data


class ServerStates(VLLMStates):
    """``VLLMStates``' interface (``extract``, ``states``) answered by vLLM servers at ``urls``.

    ``timeout``: seconds one request may take. ``concurrency``: requests in flight (over all servers).
    The target directory is read only for its config (layers, hidden size): the ids asked for are the
    in-process engine's (``extract_ids``), and every answer is checked against them and the prompt.
    """

    def __init__(self, urls: Sequence[str], path: str | Path, *, aux_layer_ids: Sequence[int] | None = None,
                 timeout: float = 600.0, concurrency: int = 32, trust_remote_code: bool = False) -> None:
        super().__init__(path, aux_layer_ids=aux_layer_ids, trust_remote_code=trust_remote_code)
        if not urls:
            raise VLLMError("no server URLs given")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = float(timeout)
        self.concurrency = int(concurrency)
        self._models: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._next = 0  # round-robin position over the servers

    def _request(self, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise VLLMError(f"{url}: HTTP {e.code}: {' '.join(detail.split())}") from None
        except (urllib.error.URLError, OSError) as e:
            raise VLLMError(f"{url}: {getattr(e, 'reason', e)}") from None

    def _model(self, url: str) -> str:
        name = self._models.get(url)
        if name is None:
            models = self._request(f"{url}/v1/models").get("data") or []
            if not models:
                raise VLLMError(f"{url}/v1/models lists no model")
            name = self._models[url] = str(models[0]["id"])
        return name

    def _one(self, job: tuple[int, Sequence[int]]) -> tuple[Tensor, Tensor]:
        k, ids = job
        url = self.urls[k % len(self.urls)]
        prompt = [int(t) for t in ids]
        out = self._request(f"{url}/v1/completions", {"model": self._model(url), "prompt": prompt, "max_tokens": 1,
                                                       "temperature": 0.0})
        path = (out.get("kv_transfer_params") or {}).get("hidden_states_path")
        if path is None:
            raise VLLMError(f"the server at {url} returned no hidden states: start it with the extraction method and "
                            "the hidden-states connector (docs/large-targets.md)")
        try:
            data = _read_states(path)
        except FileNotFoundError:
            raise VLLMError(f"the server at {url} wrote the states to {path}, which this machine cannot read: "
                            "its shared_storage_path must be on a mount shared with the trainer, at the same "
                            "path") from None
        hs, got = data["hidden_states"], data["token_ids"].tolist()
        if hs.ndim != 3 or hs.shape[1] != len(self.extract_ids) or hs.shape[2] != self.hidden_size:
            raise VLLMError(f"the server at {url} extracts {hs.shape[1] if hs.ndim == 3 else '?'} layers of width "
                            f"{hs.shape[-1]}; peagle needs the layer ids {list(self.extract_ids)} of hidden size "
                            f"{self.hidden_size} (start it with eagle_aux_hidden_state_layer_ids "
                            f"{list(self.extract_ids)})")
        if got != prompt or hs.shape[0] != len(prompt):
            raise VLLMError(f"the server at {url} returned states of other tokens ({len(got)} for a prompt of "
                            f"{len(prompt)})")
        return self.split(hs.to(torch.float32) if hs.dtype == torch.float64 else hs)

    def extract(self, token_ids: Sequence[Sequence[int]]) -> list[tuple[Tensor, Tensor]]:
        if not token_ids:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="peagle-vllm-server")
        start, self._next = self._next, self._next + len(token_ids)
        return list(self._pool.map(self._one, enumerate(token_ids, start)))

    def reset(self) -> None:
        """After a failure: ask each server its model name again (a restarted server may serve another)."""
        self._models.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
