"""``data.states`` (online | cache | stream, auto) against ``data.cache`` and the ``data.stream_*`` keys: the
validator refuses every invalid combination in one line; resume treats the stream's keys as free."""

from __future__ import annotations

from typing import Any

import pytest

from peagle.config.training import ConfigError, config_from_dict, states_source
from peagle.run.resume import RESUME_ACCEPTABLE, RESUME_FREE


def _cfg(**data: Any) -> Any:
    return config_from_dict({"data": {"dataset": "d", **data}, "model": {"target": "t"},
                             "train": {"output_dir": "o"}})


def test_auto_resolves_from_data_cache() -> None:
    assert states_source(_cfg().data) == "online"
    assert states_source(_cfg(cache="c").data) == "cache"
    assert states_source(_cfg(states="cache", cache="c").data) == "cache"
    cfg = _cfg(states="stream", stream_servers=["http://a:1", "https://b:2/"])
    assert states_source(cfg.data) == "stream" and cfg.data.stream_servers == ["http://a:1", "https://b:2/"]
    d = _cfg(states="stream").data
    assert (d.stream_servers, d.stream_prefetch, d.stream_retries, d.stream_timeout) == (None, 2, 3, 600.0)


@pytest.mark.parametrize("data, match", [
    ({"states": "cache"}, "data.states cache needs data.cache"),
    ({"states": "stream", "cache": "c"}, "data.cache is set but data.states is stream"),
    ({"states": "online", "cache": "c"}, "data.cache is set but data.states is online"),
    ({"stream_servers": ["http://a:1"]}, "data.stream_servers is set but data.states is auto"),
    ({"states": "stream", "stream_servers": ["a:1"]}, "'a:1' is not an http:// or https:// URL"),
    ({"states": "stream", "stream_servers": []}, "data.stream_servers is empty"),
    ({"states": "stream", "stream_servers": ["http://a:1"], "stream_tensor_parallel_size": 2},
     "stream_tensor_parallel_size is for the in-process engine"),
    ({"states": "stream", "stream_prefetch": 0}, "data.stream_prefetch = 0 is out of range"),
    ({"states": "stream", "stream_timeout": 0}, "data.stream_timeout = 0.0 is out of range"),
    ({"states": "stream", "stream_retries": -1}, "data.stream_retries = -1 is out of range"),
    ({"states": "streamed"}, "data.states must be 'auto' or 'online' or 'cache' or 'stream'"),
])
def test_invalid_combinations_are_one_line(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        _cfg(**data)
    assert "\n" not in str(e.value)


def test_resume_keys() -> None:
    assert "data.states" in RESUME_ACCEPTABLE  # another source rounds the states otherwise
    stream_keys = {"data.stream_servers", "data.stream_prefetch", "data.stream_retries", "data.stream_timeout",
                   "data.stream_concurrency", "data.stream_tensor_parallel_size",
                   "data.stream_gpu_memory_utilization"}
    assert stream_keys <= RESUME_FREE  # the same states, asked differently (e.g. restarted servers' new URLs)
