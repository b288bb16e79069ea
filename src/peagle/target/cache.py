"""Offline mode: the target's aux and final hidden states of every prepared example, on disk.

``write_cache`` runs the target once over a prepared dataset and writes bf16 safetensors shards
(``shard_00000.safetensors``: ``aux`` [T, 3H], ``final`` [T, H] concatenated over the shard's
examples, ``offsets`` [k+1]) plus ``cache_manifest.json``. Each shard is written to a temp file
and renamed (``peagle.util.files.atomic_file``, fsync'ed), then recorded in the manifest (also replaced
atomically), so an interrupted run resumes without redoing finished shards; the temp files a killed
run left behind are removed when it resumes. ``CachedStates`` memory-maps the shards and serves the
same ``states(packed_rows)`` interface as the online ``Target``.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peagle.data.packing import PackedRows, collate, pack
from peagle.data.prepared import PreparedData, load_prepared
from peagle.util.files import atomic_file, clean_leftovers, write_atomic

CACHE_MANIFEST = "cache_manifest.json"
FORMAT = "peagle-cache-v1"


class CacheError(ValueError):
    """The cache directory cannot be used (mismatch with the dataset/target, missing shard)."""


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _dataset_fingerprint(data: PreparedData) -> str:
    m = data.manifest
    key = {"n": len(data), "counts": m.get("counts"), "template": m.get("chat_template_sha256"),
           "tokenizer_len": (m.get("tokenizer") or {}).get("len"), "max_length": m.get("max_length")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(manifest, indent=1), fsync=True)


def _save_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write one shard atomically: temp file in the same directory, fsync, rename."""
    from safetensors.torch import save_file

    with atomic_file(path, fsync=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _open_cache_dir(cache_dir: str | Path) -> Path:
    """Create the directory; remove the temp files a killed run left (partial shards can be GBs)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(cache_dir, "shard_*.safetensors")
    clean_leftovers(cache_dir, CACHE_MANIFEST)
    return cache_dir


def _check_sizes(data: PreparedData, shard_size: int, max_length: int | None) -> tuple[list[int], int]:
    """Check ``shard_size`` and the row length: (example lengths, ``max_length``, default the dataset's)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    lengths = data.lengths
    max_length = max_length or int(data.manifest.get("max_length") or max(lengths))
    if max(lengths) > max_length:
        raise ValueError(f"max_length {max_length} is shorter than the longest example ({max(lengths)})")
    return lengths, max_length


def _header(target: Any, data: PreparedData, shard_size: int) -> dict[str, Any]:
    """What a cache is a cache of: a resumed run must match it (the dataset's path aside)."""
    H = int(target.hidden_size)
    return {
        "format": FORMAT,
        "dataset": str(data.path.resolve()),
        "dataset_fingerprint": _dataset_fingerprint(data),
        "num_examples": len(data),
        "shard_size": shard_size,
        "target": str(Path(target.path).resolve()),
        "aux_layer_ids": list(target.aux_layer_ids),
        "hidden_size": H,
        "dtype": "bfloat16",
    }


def _resume_or_start(cache_dir: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an earlier run with the same header, or a new (empty) one written now."""
    mpath = cache_dir / CACHE_MANIFEST
    if mpath.exists():
        manifest = json.loads(mpath.read_text())
        diff = [k for k, v in header.items() if k != "dataset" and manifest.get(k) != v]
        if diff:
            raise CacheError(f"{cache_dir} holds a cache for another setup (differs in {', '.join(diff)}); "
                             "use a new cache directory")
    else:
        manifest = {**header, "shards": {}, "complete": False}
        _write_manifest(mpath, manifest)
    return manifest


def _pending_shards(cache_dir: Path, manifest: dict[str, Any], num_shards: int) -> list[int]:
    """The shards still to write: all but those recorded in the manifest whose file exists."""
    done = {int(k) for k, s in manifest["shards"].items() if (cache_dir / s["file"]).exists()}
    return [k for k in range(num_shards) if k not in done]


def _shard_states(target: Any, data: PreparedData, lengths: list[int], start: int, end: int, max_length: int,
                  rows_per_forward: int) -> dict[str, Tensor]:
    """One shard's tensors: examples [start, end) packed into rows of ``max_length``, run through the
    target ``rows_per_forward`` rows at a time, their bf16 states concatenated in example order."""
    idx = list(range(start, end))
    exs = [data[i] for i in idx]
    rows = pack([lengths[i] for i in idx], max_length)
    aux_parts: dict[int, Tensor] = {}
    fin_parts: dict[int, Tensor] = {}
    for r0 in range(0, len(rows), rows_per_forward):
        chunk = rows[r0:r0 + rows_per_forward]
        packed = collate(exs, chunk, max_length)
        aux, fin = target.states(packed)
        aux, fin = aux.to("cpu", torch.bfloat16), fin.to("cpu", torch.bfloat16)
        for b, row in enumerate(chunk):
            off = 0
            for j in row:
                L = lengths[start + j]
                aux_parts[j] = aux[b, off:off + L].clone()
                fin_parts[j] = fin[b, off:off + L].clone()
                off += L
    offsets = [0]
    for j in range(len(idx)):
        offsets.append(offsets[-1] + lengths[start + j])
    return {
        "aux": torch.cat([aux_parts[j] for j in range(len(idx))]),
        "final": torch.cat([fin_parts[j] for j in range(len(idx))]),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }


def _write_shard(cache_dir: Path, manifest: dict[str, Any], k: int, start: int, end: int,
                 tensors: dict[str, Tensor], num_shards: int) -> None:
    """Write shard k atomically, then record it in the manifest (replaced atomically too)."""
    _save_shard(cache_dir / _shard_name(k), tensors, {"start": str(start), "end": str(end)})
    tokens = int(tensors["offsets"][-1])
    manifest["shards"][str(k)] = {"file": _shard_name(k), "start": start, "end": end, "tokens": tokens}
    manifest["complete"] = len(manifest["shards"]) == num_shards
    _write_manifest(cache_dir / CACHE_MANIFEST, manifest)


def write_cache(
    target: Any,
    dataset: str | Path | PreparedData,
    cache_dir: str | Path,
    *,
    shard_size: int = 1024,
    max_length: int | None = None,
    rows_per_forward: int = 4,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``target`` (a ``peagle.target.hf.Target``) over a prepared dataset and cache its states.

    Examples [k·shard_size, (k+1)·shard_size) form shard k; inside a shard they are packed into rows
    of ``max_length`` (default: the dataset's) and run ``rows_per_forward`` rows at a time with
    per-document attention. Resumes: shards already recorded in the manifest are skipped (and the
    temp files of a killed run removed, so run one writer per cache directory at a time).
    ``on_shard(k)`` is called after shard k is recorded. Returns the manifest.
    """
    from tqdm.auto import tqdm

    data = dataset if isinstance(dataset, PreparedData) else load_prepared(dataset)
    cache_dir = _open_cache_dir(cache_dir)
    lengths, max_length = _check_sizes(data, shard_size, max_length)
    manifest = _resume_or_start(cache_dir, _header(target, data, shard_size))
    n = len(data)
    num_shards = (n + shard_size - 1) // shard_size
    todo = _pending_shards(cache_dir, manifest, num_shards)
    bar = tqdm(total=num_shards, initial=num_shards - len(todo), desc="caching target states", unit="shard",
               disable=not progress)
    for k in todo:
        start, end = k * shard_size, min(n, (k + 1) * shard_size)
        tensors = _shard_states(target, data, lengths, start, end, max_length, rows_per_forward)
        _write_shard(cache_dir, manifest, k, start, end, tensors, num_shards)
        bar.update(1)
        if on_shard is not None:
            on_shard(k)
    bar.close()
    if not manifest["complete"]:
        manifest["complete"] = True
        _write_manifest(cache_dir / CACHE_MANIFEST, manifest)
    return manifest


class CachedStates:
    """Memory-mapped reads of a finished cache; same ``states(packed)`` interface as ``Target``.

    ``dtype``: cast returned tensors (default: stored bf16). ``max_open``: shard files kept open.
    """

    def __init__(self, cache_dir: str | Path, *, dtype: torch.dtype | None = None, max_open: int = 64) -> None:
        self.cache_dir = Path(cache_dir)
        mpath = self.cache_dir / CACHE_MANIFEST
        if not mpath.exists():
            raise CacheError(f"{self.cache_dir} is not a peagle cache (no {CACHE_MANIFEST})")
        self.manifest = json.loads(mpath.read_text())
        if not self.manifest.get("complete"):
            raise CacheError(f"cache {self.cache_dir} is incomplete "
                             f"({len(self.manifest['shards'])} shards written); rerun write_cache to resume")
        self.num_examples = int(self.manifest["num_examples"])
        self.shard_size = int(self.manifest["shard_size"])
        self.aux_layer_ids = tuple(self.manifest["aux_layer_ids"])
        self.hidden_size = int(self.manifest["hidden_size"])
        self.dtype = dtype
        self.max_open = max_open
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._offsets: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.num_examples

    def _shard(self, k: int) -> Any:
        from safetensors import safe_open

        f = self._open.get(k)
        if f is None:
            info = self.manifest["shards"].get(str(k))
            if info is None or not (self.cache_dir / info["file"]).exists():
                raise CacheError(f"cache {self.cache_dir}: shard {k} is missing")
            f = safe_open(str(self.cache_dir / info["file"]), framework="pt")
            self._offsets[k] = f.get_tensor("offsets").tolist()
            self._open[k] = f
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(k)
        return f

    def get(self, i: int) -> tuple[Tensor, Tensor]:
        """Example i's aux [n, 3H] and final [n, H] states (unshifted, like the target's output)."""
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example {i} out of range (cache has {self.num_examples})")
        k, j = divmod(int(i), self.shard_size)
        f = self._shard(k)
        a, b = self._offsets[k][j], self._offsets[k][j + 1]
        aux, fin = f.get_slice("aux")[a:b], f.get_slice("final")[a:b]
        if self.dtype is not None:
            aux, fin = aux.to(self.dtype), fin.to(self.dtype)
        return aux, fin

    def states(self, packed: PackedRows) -> tuple[Tensor, Tensor]:
        """Packed aux [B, n, 3H] and final [B, n, H] assembled from the cache (zeros at padding)."""
        return assemble_states(packed, self.get, 3 * self.hidden_size, self.hidden_size,
                               self.dtype or torch.bfloat16, where=f"cache {self.cache_dir}")


def documents(packed: PackedRows) -> list[tuple[int, int, int, int]]:
    """Every document of ``packed`` in row order: (row, start, length, example index)."""
    exi = packed.example_index.cpu()
    docs = packed.document_ids.cpu()
    B, n = docs.shape
    out = []
    for b in range(B):
        pos = 0
        while pos < n and docs[b, pos] >= 0:
            run = int((docs[b, pos:] == docs[b, pos]).int().cumprod(0).sum())
            out.append((b, pos, run, int(exi[b, pos])))
            pos += run
    return out


def assemble_states(packed: PackedRows, get: Callable[[int], tuple[Tensor, Tensor]], aux_width: int,
                    hidden_size: int, dtype: torch.dtype, *, where: str) -> tuple[Tensor, Tensor]:
    """Packed aux [B, n, aux_width] and final [B, n, H] from per-example states ``get(i)`` (zeros at padding):
    how the cache and the streamed source (`peagle.target.stream`) give a batch its states."""
    B, n = packed.input_ids.shape
    aux = torch.zeros(B, n, aux_width, dtype=dtype)
    fin = torch.zeros(B, n, hidden_size, dtype=dtype)
    for b, pos, run, i in documents(packed):
        a_i, f_i = get(i)
        if a_i.shape[0] != run:
            raise CacheError(f"{where}: example {i} has {a_i.shape[0]} cached positions but {run} in the batch "
                             "(built from another dataset?)")
        aux[b, pos:pos + run] = a_i
        fin[b, pos:pos + run] = f_i
    return aux, fin
