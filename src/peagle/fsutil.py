"""Directories that appear whole or not at all.

:func:`atomic_dir` yields a hidden temporary directory next to the destination; when the ``with``
block succeeds the directory is renamed into place (a previous one is moved aside first and removed
only after the rename), when it fails (any exception, KeyboardInterrupt included) the temporary
directory is removed, so neither a half-written destination nor a hidden ``.NAME.*`` directory is
left behind. The directory gets the mode a plain ``mkdir`` would give (0777 minus the umask, i.e.
usually 0755), not ``mkdtemp``'s 0700.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "default_dir_mode"]


def default_dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask (usually 0o755)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextmanager
def atomic_dir(dest: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Write a directory atomically: ``with atomic_dir(out) as tmp: <write into tmp>``.

    On success ``tmp`` becomes ``dest``. An existing ``dest`` is replaced only with
    ``replace=True`` (else FileExistsError before anything is written); it is renamed aside, the
    new directory renamed into place, then the old one removed, so ``dest`` is never missing
    half-way. The parent directory is created if needed.
    """
    dest = Path(dest)
    if dest.exists() and not replace:
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        os.chmod(tmp, default_dir_mode())
        yield tmp
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.rmdir(old)
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if old is not None:
                os.replace(old, dest)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
