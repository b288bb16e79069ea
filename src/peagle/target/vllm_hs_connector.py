"""vLLM's ``ExampleHiddenStatesConnector`` with a host-memory write path (imported by vLLM's workers only).

vLLM 0.32's connector reads a finished request's hidden states out of the ``extract_hidden_states``
cache-only KV layer and writes them to ``<storage>/<request id>.safetensors``; its copy out of the
cache uses a CUDA stream, a CUDA event and pinned memory, which a CPU worker does not have
(``pin_memory=True requires a CUDA or other accelerator backend``). This subclass changes only that
copy when the cache lives in host memory: the same slots are read with vLLM's own
``extract_from_kv_cache`` and written by the connector's writer pool under the same lock file. On an
accelerator every call goes to vLLM's code unchanged. Selected with
``kv_connector_module_path="peagle.target.vllm_hs_connector"`` (``peagle.target.vllm_states``).
"""

from __future__ import annotations

import fcntl
import os
from functools import partial

import torch
from vllm.distributed.kv_transfer.kv_connector.v1 import example_hidden_states_connector as _ehs

__all__ = ["ExampleHiddenStatesConnector"]


class _Done:
    """Stands in for the CUDA event of a copy that already finished (host memory)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class ExampleHiddenStatesConnector(_ehs.ExampleHiddenStatesConnector):
    """vLLM's file connector; host-memory KV caches are copied synchronously (see module docstring)."""

    def _submit_async_write(self, pending: _ehs.PendingSave) -> None:
        if self._kv_cache is None or self._kv_cache.device.type != "cpu":
            return super()._submit_async_write(pending)
        if not self._is_tp_rank_zero:
            return None
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (offsets[None, :] + blocks[:, None] * self._block_size).flatten()
        hidden = _ehs.extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0]).clone()
        tensors = {"hidden_states": hidden, "token_ids": pending.token_ids.clone()}
        assert pending.req_id not in self._req_futures, "Found another KV transfer request with same req_id!"
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _Done()
        future = self._executor.submit(self._write_tensors, tensors, done, pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = done
        self._req_futures[pending.req_id] = future
        future.add_done_callback(partial(self._on_write_done, pending.req_id))
        return None
