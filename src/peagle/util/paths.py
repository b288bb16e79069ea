"""Where peagle keeps what it builds once and reuses (the cache root)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "PEAGLE_CACHE"


def cache_root() -> Path:
    """``$PEAGLE_CACHE`` or ``~/.cache/peagle``: the folder under which peagle's caches live.

    Built models go to ``<root>/models/<name>`` (``peagle.target.real_model``). The demo's target
    predates this helper and keeps its own meaning of the variable: ``$PEAGLE_CACHE`` itself, else
    ``~/.cache/peagle/demo`` (``peagle.demo.tiny_lm.default_cache_dir``); the names do not collide.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "peagle"
