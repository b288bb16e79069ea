"""peagle.target.cache: offline bf16 shards of target states, atomic + resumable, memory-mapped reads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHATS

import peagle.target.cache as cache_mod
from peagle.data import collate, load_prepared, pack, prepare
from peagle.target.cache import CACHE_MANIFEST, CachedStates, CacheError, write_cache
from peagle.target.hf import Target, embedding_rows


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, llama_dir):
    d = tmp_path_factory.mktemp("cache_data")
    src = d / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 3))  # 12 examples
    prepare(src, llama_dir, d / "prep", max_length=64, vocab_size=embedding_rows(llama_dir),
            progress=False)
    return load_prepared(d / "prep")


@pytest.fixture(scope="module")
def target(llama_dir):
    return Target(llama_dir, device="cpu")


def _close(cached, fresh):
    torch.testing.assert_close(cached.float(), fresh.float(), rtol=2**-7, atol=2e-3)


def test_write_read_equals_fresh_target(prepared, target, tmp_path):
    m = write_cache(target, prepared, tmp_path / "c", shard_size=5, progress=False)
    assert m["complete"] and len(m["shards"]) == 3 and m["aux_layer_ids"] == list(target.aux_layer_ids)
    assert m["dtype"] == "bfloat16" and m["num_examples"] == 12
    c = CachedStates(tmp_path / "c")
    assert len(c) == 12
    for i in range(12):
        aux, fin = c.get(i)
        assert aux.dtype == torch.bfloat16 and aux.shape == (prepared.lengths[i], 3 * target.hidden_size)
        a1, f1 = target.hidden_states(torch.tensor(prepared[i]["input_ids"]))
        _close(aux, a1)
        _close(fin, f1)
    # The packed-batch interface matches the online target's.
    rows = pack(prepared.lengths, 64, seed=0)[:3]
    p = collate(prepared, rows, 64)
    ca, cf = CachedStates(tmp_path / "c", dtype=torch.float32).states(p)
    ta, tf = target.states(p)
    real = p.document_ids >= 0
    _close(ca[real], ta[real])
    _close(cf[real], tf[real])
    assert ca.dtype == torch.float32 and not ca[~real].any()


def test_resume_after_interruption_writes_only_missing_shards(prepared, target, tmp_path, monkeypatch):
    d = tmp_path / "c"

    def stop_after_two(k):
        if k == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        write_cache(target, prepared, d, shard_size=3, progress=False, on_shard=stop_after_two)
    m = json.loads((d / CACHE_MANIFEST).read_text())
    assert sorted(m["shards"]) == ["0", "1"] and not m["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        CachedStates(d)
    mtimes = {f.name: f.stat().st_mtime_ns for f in d.glob("shard_*.safetensors")}
    assert sorted(mtimes) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    # A crash during a shard write leaves only a temp file, which is ignored and removed on resume.
    (d / ".shard_00002.safetensors.tmp-12345").write_bytes(b"partial")  # (older peagle: pid-suffixed)
    (d / ".shard_00003.safetensors.tmp-0a1b2c3d4e5f6789").write_bytes(b"partial")

    saved, forwards = [], []
    real_save = cache_mod._save_shard
    monkeypatch.setattr(cache_mod, "_save_shard", lambda path, *a: (saved.append(path.name), real_save(path, *a)))

    class Counting:
        def __init__(self, t):
            self.t = t
            self.path, self.aux_layer_ids, self.hidden_size = t.path, t.aux_layer_ids, t.hidden_size

        def states(self, packed):
            forwards.append(int((packed.document_ids >= 0).sum()))
            return self.t.states(packed)

    m = write_cache(Counting(target), prepared, d, shard_size=3, progress=False)
    assert saved == ["shard_00002.safetensors", "shard_00003.safetensors"]
    assert sum(forwards) == sum(prepared.lengths[6:])  # only the missing examples ran the target
    assert m["complete"]
    assert all((d / name).stat().st_mtime_ns == t for name, t in mtimes.items())
    assert sorted(p.name for p in d.iterdir()) == [CACHE_MANIFEST] + [f"shard_{k:05d}.safetensors" for k in range(4)]
    c = CachedStates(d)
    for i in (0, 5, 6, 11):
        a1, f1 = target.hidden_states(torch.tensor(prepared[i]["input_ids"]))
        _close(c.get(i)[0], a1)
        _close(c.get(i)[1], f1)

    # Nothing left to do: a third run writes nothing.
    saved.clear()
    write_cache(target, prepared, d, shard_size=3, progress=False)
    assert saved == []


def test_cache_refuses_other_setup(prepared, target, tmp_path):
    write_cache(target, prepared, tmp_path / "c", shard_size=6, progress=False)
    with pytest.raises(CacheError, match="shard_size"):
        write_cache(target, prepared, tmp_path / "c", shard_size=4, progress=False)
    with pytest.raises(CacheError, match="not a peagle cache"):
        CachedStates(tmp_path)
    c = CachedStates(tmp_path / "c")
    with pytest.raises(IndexError):
        c.get(12)
    bad = collate([{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}], [[0]], 8)
    with pytest.raises(CacheError, match="cached positions"):
        c.states(bad)
