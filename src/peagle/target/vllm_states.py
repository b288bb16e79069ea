"""Target states from the real vLLM: ``peagle prepare --cache DIR --engine vllm``.

For targets that do not fit the trainer's GPUs the offline cache (``peagle.target.cache``) is filled by the
serving engine, sharded the way users serve the target (``tensor_parallel_size`` /
``pipeline_parallel_size``). vLLM's ``extract_hidden_states`` speculative method makes the target
return the residual stream at the layer ids listed in ``eagle_aux_hidden_state_layer_ids`` (vLLM's
``_maybe_add_hidden_state``: id 0 = the embedding output, id i = hidden + residual after layer i−1,
i.e. the input of layer i, exactly ``docs/conventions.md``), stores them in a cache-only KV layer,
and its hidden-states KV connector writes each finished request's states to a safetensors file
(``hidden_states`` [n, k, H] in increasing id order, ``token_ids`` [n]).

The loss needs one more state, the final hidden state (the input of the final norm): that is id L
(L = the number of decoder layers), the output of the last layer before the norm. So vLLM is asked
for ``sorted(set(aux_layer_ids) | {L})`` and the columns are split into the draft's aux states and the
final state. Each example is one request of ``max_tokens=1`` (its prompt = the example's token ids),
so its states are the prefill's, one document at a time, as the HF path computes them with
per-document attention. ``VLLMStates`` has ``Target``'s ``states(packed)`` interface, so the cache is
written by the same ``peagle.target.cache.write_cache`` (same schema, bf16, manifest, resume); the engine
starts on the first shard that is not cached yet, so rerunning a finished cache starts nothing.

On a CPU worker vLLM's connector cannot copy the states out (its copy needs CUDA pinned memory and
streams); ``peagle.target.vllm_hs_connector`` subclasses it and only replaces that copy in host memory.
vLLM is an optional dependency, imported only when an engine starts.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peagle.model.config import resolve_aux_layer_ids
from peagle.target.vllm_engine import VLLMError, import_llm, shutdown

__all__ = ["VLLMStates", "write_vllm_cache"]

CONNECTOR = "ExampleHiddenStatesConnector"
CONNECTOR_MODULE = "peagle.target.vllm_hs_connector"


def _text_config(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        text = str(e).strip().splitlines()
        raise VLLMError(f"target {path} is not a Hugging Face model directory: "
                        f"{text[0] if text else type(e).__name__}") from None
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class VLLMStates:
    """A vLLM engine that returns a target's aux and final pre-norm hidden states (``Target``'s interface).

    ``dtype`` (a vLLM dtype string) default: "bfloat16" with CUDA, else "float32" (as ``Target``).
    ``max_model_len`` must exceed the longest example (a request of n prompt tokens needs n + 1).
    ``storage_dir``: where vLLM's connector writes its per-request files (a fresh subdirectory,
    removed on ``close``; default: the system temp dir). ``engine_args`` go to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        aux_layer_ids: Sequence[int] | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        dtype: str | None = None,
        max_model_len: int | None = None,
        storage_dir: str | Path | None = None,
        trust_remote_code: bool = False,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise VLLMError(f"target {path}: no model config.json (expected a local Hugging Face model directory)")
        cfg = _text_config(self.path, trust_remote_code)
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        self.aux_layer_ids = resolve_aux_layer_ids(aux_layer_ids, self.num_layers)
        # what vLLM is asked for: the aux ids and L (the final norm's input), increasing, distinct
        self.extract_ids = tuple(sorted(set(self.aux_layer_ids) | {self.num_layers}))
        self._aux_cols = [self.extract_ids.index(i) for i in self.aux_layer_ids]
        self._final_col = self.extract_ids.index(self.num_layers)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.pipeline_parallel_size = int(pipeline_parallel_size)
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise VLLMError("tensor/pipeline parallel sizes must be >= 1")
        self.dtype = dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
        self.max_model_len = max_model_len
        self.trust_remote_code = trust_remote_code
        self.engine_args = dict(engine_args or {})
        self._storage_root = Path(storage_dir) if storage_dir is not None else None
        self._storage: Path | None = None
        self._llm: Any = None

    # -- engine ---------------------------------------------------------------------------------

    def _start(self) -> Any:
        if self._llm is not None:
            return self._llm
        LLM = import_llm()  # noqa: N806 (a class)
        if self._storage_root is not None:
            self._storage_root.mkdir(parents=True, exist_ok=True)
        self._storage = Path(tempfile.mkdtemp(prefix="peagle-vllm-hs-", dir=self._storage_root))
        spec = {"method": "extract_hidden_states", "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(self.extract_ids)}}}
        kv = {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_producer",
              "kv_connector_extra_config": {"shared_storage_path": str(self._storage)}}
        args = {"dtype": self.dtype, "seed": 0, "enforce_eager": not torch.cuda.is_available(),
                "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size,
                "trust_remote_code": self.trust_remote_code, **self.engine_args}
        if self.max_model_len is not None:
            args.setdefault("max_model_len", int(self.max_model_len))
        try:
            self._llm = LLM(model=str(self.path), speculative_config=spec, kv_transfer_config=kv, **args)
        except Exception as e:  # vLLM raises plain RuntimeError/ValueError from its engine process
            shutil.rmtree(self._storage, ignore_errors=True)
            text = str(e).strip().splitlines()
            hint = ""
            if self.pipeline_parallel_size > 1 and "SupportsPP" in str(e):
                # vLLM validates the extraction "draft" (ExtractHiddenStatesModel) like a model, and in 0.32
                # it does not implement SupportsPP: the refusal is about it, not about the target
                hint = (" (vLLM 0.32 refuses pipeline parallelism with extract_hidden_states: its "
                        "ExtractHiddenStatesModel does not implement SupportsPP; use --tensor-parallel-size)")
            raise VLLMError(f"vLLM could not extract hidden states of {self.path} "
                            f"(tp={self.tensor_parallel_size}, pp={self.pipeline_parallel_size}): "
                            f"{text[0] if text else type(e).__name__}{hint}") from None
        return self._llm

    def close(self) -> None:
        """Shut the engine down and remove the connector's directory."""
        if self._llm is not None:
            llm, self._llm = self._llm, None
            shutdown(llm)
        if self._storage is not None:
            shutil.rmtree(self._storage, ignore_errors=True)
            self._storage = None

    def reset(self) -> None:
        """After a failure: shut the engine down; the next `extract` starts a fresh one."""
        self.close()

    def __enter__(self) -> VLLMStates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- states ---------------------------------------------------------------------------------

    def extract(self, token_ids: Sequence[Sequence[int]]) -> list[tuple[Tensor, Tensor]]:
        """Per sequence: aux [n, len(aux_layer_ids)·H] (increasing ids) and final pre-norm [n, H],
        in the engine's dtype, as vLLM computed them (each sequence one request, prefill only)."""
        from vllm import SamplingParams
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states,
            load_hidden_states,
        )
        from vllm.inputs import TokensPrompt

        if not token_ids:
            return []
        llm = self._start()
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in token_ids]
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        outs = llm.generate(prompts, params, use_tqdm=False)
        result = []
        for ids, out in zip(token_ids, outs, strict=True):
            path = (out.kv_transfer_params or {}).get("hidden_states_path")
            if path is None:
                raise VLLMError(f"vLLM returned no hidden states for request {out.request_id} "
                                "(is the hidden-states connector active?)")
            data = load_hidden_states(path)
            cleanup_hidden_states(path)
            hs, got = data["hidden_states"], data["token_ids"].tolist()
            if got != [int(t) for t in ids] or hs.shape != (len(ids), len(self.extract_ids), self.hidden_size):
                raise VLLMError(f"vLLM's hidden states for request {out.request_id} do not match its prompt "
                                f"(tokens {len(got)} vs {len(ids)}, shape {tuple(hs.shape)})")
            result.append(self.split(hs))
        return result

    def split(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        """The connector's ``hidden_states`` [n, len(extract_ids), H] → aux [n, len(aux)·H] (the draft's
        ids, increasing) and final [n, H] (id L, the final norm's input)."""
        return hs[:, self._aux_cols].reshape(hs.shape[0], -1), hs[:, self._final_col].clone()

    def states(self, packed: Any) -> tuple[Tensor, Tensor]:
        """Aux [B, n, 3H] and final [B, n, H] for a ``peagle.data.PackedRows`` (zeros at padding):
        every document of every row is one vLLM request."""
        ids, docs = packed.input_ids.cpu(), packed.document_ids.cpu()
        B, n = ids.shape
        spans: list[tuple[int, int, int]] = []
        for b in range(B):
            pos = 0
            while pos < n and docs[b, pos] >= 0:
                run = int((docs[b, pos:] == docs[b, pos]).int().cumprod(0).sum())
                spans.append((b, pos, run))
                pos += run
        got = self.extract([ids[b, p:p + r].tolist() for b, p, r in spans])
        dtype = got[0][0].dtype if got else torch.float32
        aux = torch.zeros(B, n, len(self.aux_layer_ids) * self.hidden_size, dtype=dtype)
        fin = torch.zeros(B, n, self.hidden_size, dtype=dtype)
        for (b, p, r), (a, f) in zip(spans, got, strict=True):
            aux[b, p:p + r] = a
            fin[b, p:p + r] = f
        return aux, fin


def write_vllm_cache(
    target: str | Path,
    dataset: Any,
    cache_dir: str | Path,
    *,
    shard_size: int = 1024,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    rows_per_request_batch: int = 64,
    progress: bool = True,
    trust_remote_code: bool = False,
    engine_args: dict[str, Any] | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``peagle.target.cache.write_cache`` with the states from vLLM: same files, manifest and resume.

    ``rows_per_request_batch`` packed rows (of the dataset's max_length) go to vLLM in one ``generate``
    call; vLLM's scheduler batches their documents. The connector's files live under ``cache_dir``
    while the run lasts. Returns the manifest.
    """
    from peagle.data.prepared import PreparedData, load_prepared
    from peagle.target.cache import write_cache

    data = dataset if isinstance(dataset, PreparedData) else load_prepared(dataset)
    max_length = int(data.manifest.get("max_length") or max(data.lengths))
    states = VLLMStates(target, tensor_parallel_size=tensor_parallel_size,
                        pipeline_parallel_size=pipeline_parallel_size, max_model_len=max_length + 1,
                        storage_dir=Path(cache_dir) / ".vllm-hidden-states", trust_remote_code=trust_remote_code,
                        engine_args=engine_args)
    try:
        return write_cache(states, data, cache_dir, shard_size=shard_size, rows_per_forward=rows_per_request_batch,
                           progress=progress, on_shard=on_shard)
    finally:
        states.close()
        with contextlib.suppress(OSError):  # only when empty: the run's own subdirectory is gone
            (Path(cache_dir) / ".vllm-hidden-states").rmdir()
