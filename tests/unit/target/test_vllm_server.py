"""peagle.target.vllm_server without vLLM: `ServerStates` against a fake OpenAI-compatible server that answers
like vLLM's extraction method + hidden-states connector (a file per request, its path in
``kv_transfer_params``), and the server command `server_args` builds."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from peagle.target.vllm_engine import VLLMError
from peagle.target.vllm_server import ServerStates, server_args


class FakeServer:
    """``/v1/models`` and ``/v1/completions``: the states of a prompt are (token id + layer column) / 100."""

    def __init__(self, storage: Path, layers: int, hidden: int) -> None:
        self.storage, self.layers, self.hidden = storage, layers, hidden
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send({"data": [{"id": "/models/target"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                ids = body["prompt"]
                if fake.mode == "plain":  # a server without the connector
                    self._send({"choices": [{"text": "x"}]})
                    return
                k = fake.layers - 1 if fake.mode == "layers" else fake.layers
                path = fake.storage / f"req{uuid.uuid4().hex}.safetensors"
                hs = (torch.tensor(ids, dtype=torch.float32)[:, None, None] + torch.arange(k)[None, :, None]
                      ).expand(-1, -1, fake.hidden) / 100
                toks = torch.tensor(ids if fake.mode != "tokens" else ids[::-1])
                save_file({"hidden_states": hs.contiguous(), "token_ids": toks}, str(path))
                (path.parent / (path.name + ".lock")).touch()
                if fake.mode == "elsewhere":
                    path = Path("/nonexistent/peagle") / path.name
                self._send({"choices": [{"text": "x"}], "kv_transfer_params": {"hidden_states_path": str(path)}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake(llama_dir: Path, tmp_path: Path):
    probe = ServerStates(["http://x"], llama_dir)
    server = FakeServer(tmp_path, len(probe.extract_ids), probe.hidden_size)
    yield server
    server.close()


def test_states_split_like_the_in_process_engine(fake, llama_dir, tmp_path):
    st = ServerStates([fake.url, fake.url + "/"], llama_dir, concurrency=4)
    seqs = [[5, 6, 7], [9, 3], [4]]
    got = st.extract(seqs)
    H = st.hidden_size
    for ids, (aux, fin) in zip(seqs, got, strict=True):
        assert aux.shape == (len(ids), len(st.aux_layer_ids) * H) and fin.shape == (len(ids), H)
        col = {lid: j for j, lid in enumerate(st.extract_ids)}
        for a, lid in enumerate(st.aux_layer_ids):  # the draft's aux ids, in its order, then the final id L
            want = (torch.tensor(ids, dtype=torch.float32) + col[lid]) / 100
            assert torch.equal(aux[:, a * H], want)
        assert torch.equal(fin[:, 0], (torch.tensor(ids, dtype=torch.float32) + col[st.num_layers]) / 100)
    assert sorted(r["prompt"] for r in fake.requests) == sorted(seqs)  # concurrent: any order
    assert all(r["max_tokens"] == 1 and r["temperature"] == 0.0 and r["model"] == "/models/target"
               for r in fake.requests)
    assert not list(tmp_path.glob("req*"))  # every file read and deleted (with its lock file)
    st.close()


@pytest.mark.parametrize("mode, match", [
    ("plain", "returned no hidden states: start it with the extraction method"),
    ("layers", "peagle needs the layer ids"),
    ("tokens", "returned states of other tokens"),
    ("elsewhere", "which this machine cannot read"),
])
def test_wrong_servers_are_one_line(fake, llama_dir, mode, match):
    fake.mode = mode
    with pytest.raises(VLLMError, match=match) as e:
        ServerStates([fake.url], llama_dir).extract([[5, 6]])
    assert "\n" not in str(e.value)


def test_a_dead_server_is_a_vllm_error(llama_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(VLLMError, match=f"127.0.0.1:{port}.*(refused|Connection)"):
        ServerStates([f"http://127.0.0.1:{port}"], llama_dir, timeout=5).extract([[1, 2]])


def test_server_args():
    args = server_args("/m/t", [1, 3, 6], "/shared/hs", cpu=True, port=8123, max_model_len=129, dtype="float32")
    a = dict(zip(args[::2], args[1::2], strict=False))
    assert a["--model"] == "/m/t" and a["--port"] == "8123" and a["--host"] == "127.0.0.1"
    spec, kv = json.loads(a["--speculative-config"]), json.loads(a["--kv-transfer-config"])
    assert spec == {"method": "extract_hidden_states", "num_speculative_tokens": 1,
                    "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 6]}}}
    assert kv["kv_connector"] == "ExampleHiddenStatesConnector" and kv["kv_role"] == "kv_producer"
    assert kv["kv_connector_extra_config"] == {"shared_storage_path": "/shared/hs"}
    assert kv["kv_connector_module_path"] == "peagle.target.vllm_hs_connector" and "--enforce-eager" in args
    gpu = server_args("/m/t", [1, 3, 6], "/shared/hs", tensor_parallel_size=8)
    assert "kv_connector_module_path" not in gpu[gpu.index("--kv-transfer-config") + 1]
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "8" and "--enforce-eager" not in gpu
