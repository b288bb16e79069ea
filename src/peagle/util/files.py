"""Directories and files that appear whole or not at all.

:func:`atomic_dir` yields a hidden temporary directory next to the destination; when the ``with``
block succeeds the directory is renamed into place (a previous one is moved aside first and removed
only after the rename), when it fails (any exception, KeyboardInterrupt included) the temporary
directory is removed, so neither a half-written destination nor a hidden temporary is left behind.
:func:`atomic_file` / :func:`write_atomic` do the same for one file (temp file + ``os.replace``).

Names: the temporary of ``DEST`` is ``.DEST.tmp-<hex>``, a previous ``DEST`` being replaced is moved
aside to ``.DEST.old-<hex>`` (both next to ``DEST``). A process killed mid-write leaves such names
behind; :func:`leftover_of` recognises them and :func:`clean_leftovers` removes them (restoring an
``.old-`` whose ``DEST`` is missing: the process died between the two renames of a swap).

Modes: the temporary is created like a plain ``mkdir``/``open`` would create it, i.e. 0o777 / 0o666
minus the umask (0o755 / 0o644 under the usual umask 0o022, 0o700 / 0o600 under 0o077). The umask is
respected, never overridden: a user who restricts it wants private outputs. ``tempfile.mkdtemp``'s
0o700 (and ``mkstemp``'s 0o600) are never used, since they would survive the rename whatever the umask.
Before the rename, what was written inside is given the read permissions the umask allows, and the
execute ones for directories and for files their owner can execute (``chmod a+rX`` within the umask):
libraries that create their files private whatever the umask (safetensors' ``save_file`` writes
0o600) would otherwise publish files nobody else can read. No permission is ever removed, and none
beyond what the umask allows is added.

``fsync=True`` flushes every file and directory written (deepest first) before the rename and the
parent directory after it, so the destination survives a power loss once the call returns.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_dir",
    "atomic_file",
    "clean_leftovers",
    "describe_os_error",
    "fsync_dir",
    "fsync_tree",
    "leftover_of",
    "write_atomic",
]

# ".DEST.tmp-<hex>" / ".DEST.old-<hex>"; <hex> also matches the pid-suffixed names older peagle wrote
_LEFTOVER_RE = re.compile(r"\.(?P<dest>.+)\.(?P<kind>tmp|old)-(?P<token>[0-9a-f]+)")


def _sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{secrets.token_hex(8)}"


def leftover_of(name: str) -> tuple[str, str] | None:
    """``(DEST, "tmp" | "old")`` when ``name`` is a temporary that these helpers create, else None."""
    m = _LEFTOVER_RE.fullmatch(name)
    return (m.group("dest"), m.group("kind")) if m else None


def _remove(path: Path) -> None:
    """Remove a file, symlink or directory tree (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def clean_leftovers(parent: str | Path, dest_glob: str = "*") -> list[str]:
    """Tidy what a killed writer left in ``parent`` for destinations matching ``dest_glob``.

    ``.DEST.tmp-*`` is removed; ``.DEST.old-*`` is removed when ``DEST`` exists and renamed back to
    ``DEST`` when it does not. Returns the names handled. Only call it where no other process may be
    writing the same destinations (e.g. under a run lock): their temporaries would be removed too.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    handled = []
    for p in sorted(parent.iterdir()):
        hit = leftover_of(p.name)
        if hit is None or not fnmatch.fnmatchcase(hit[0], dest_glob):
            continue
        dest, kind = parent / hit[0], hit[1]
        if kind == "old" and not os.path.lexists(dest):
            os.replace(p, dest)
        else:
            _remove(p)
        handled.append(p.name)
    return handled


def fsync_dir(path: str | Path) -> None:
    """fsync a directory (its entries: creations, renames); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str | Path) -> None:
    """fsync every regular file under ``root``, then every directory, deepest first, ``root`` last."""
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(d)
        for name in files:
            p = os.path.join(d, name)
            if os.path.isfile(p) and not os.path.islink(p):
                _fsync_file(p)
    for d in reversed(dirs):  # os.walk is top-down: reversed, children come before their parents
        fsync_dir(d)


def _add_read_bits(path: str, allowed: int) -> None:
    """``chmod a+rX`` limited to ``allowed``; symlinks and special files are left alone."""
    st = os.lstat(path)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return
    want = allowed & (0o555 if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR else 0o444)
    if st.st_mode & want != want:
        os.chmod(path, stat.S_IMODE(st.st_mode) | want)


def _grant_reads(root: str | Path, allowed: int) -> None:
    """:func:`_add_read_bits` on ``root`` and everything under it."""
    if not os.path.isdir(root):
        _add_read_bits(os.fspath(root), allowed)
        return
    for d, _, files in os.walk(root):
        _add_read_bits(d, allowed)
        for f in files:
            _add_read_bits(os.path.join(d, f), allowed)


def _swap_into_place(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest``; an existing ``dest`` is moved aside first, removed after."""
    old = None
    if os.path.lexists(dest):
        old = _sibling(dest, "old")
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        _remove(old)


def _new_temporary(dest: Path, create: Callable[[Path], object]) -> Path:
    """A fresh ``.DEST.tmp-<hex>`` beside ``dest``, made by ``create`` (which must fail if it exists)."""
    while True:
        tmp = _sibling(dest, "tmp")
        try:
            create(tmp)
            return tmp
        except FileExistsError:  # pragma: no cover - 64 random bits collided
            continue


@contextmanager
def atomic_dir(dest: str | Path, *, replace: bool = False, fsync: bool = False) -> Iterator[Path]:
    """Write a directory atomically: ``with atomic_dir(out) as tmp: <write into tmp>``.

    On success ``tmp`` (``.DEST.tmp-<hex>``, mode 0o777 minus the umask) becomes ``dest``. An
    existing ``dest`` is replaced only with ``replace=True`` (else FileExistsError before anything
    is written); it is renamed aside, the new directory renamed into place, then the old one
    removed, so ``dest`` is never missing half-way and is kept as it was when anything fails. The
    parent directory is created if needed. ``fsync``: flush every file and directory written before
    the rename, and the parent after it.
    """
    dest = Path(dest)
    if os.path.lexists(dest) and not replace:
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(dest, lambda t: os.mkdir(t, 0o777))  # the umask applies, as for any mkdir
    try:
        allowed = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o777 minus the umask
        yield tmp
        _grant_reads(tmp, allowed)
        if fsync:
            fsync_tree(tmp)
        if not replace and os.path.lexists(dest):  # appeared while we wrote: rename would replace it
            raise FileExistsError(f"{dest} already exists")
        _swap_into_place(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        fsync_dir(dest.parent)


@contextmanager
def atomic_file(dest: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Write one file atomically: ``with atomic_file(out) as tmp: <write the file tmp>``.

    ``tmp`` (``.DEST.tmp-<hex>`` beside ``dest``) exists, empty, with mode 0o666 minus the umask;
    write it by any means (``open(tmp, "w")``, a library's ``save(..., tmp)``). On success it
    replaces ``dest`` (an existing file is replaced; readers see the old or the new file, never a
    part); on failure it is removed and ``dest`` is untouched. The parent directory is created if
    needed. ``fsync``: flush the file before the rename and the parent directory after it.
    """
    dest = Path(dest)
    if dest.is_dir():
        raise IsADirectoryError(f"{dest} is a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(dest, lambda t: os.close(os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        allowed = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 minus the umask
        yield tmp
        _grant_reads(tmp, allowed)
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        fsync_dir(dest.parent)


def write_atomic(path: str | Path, data: str | bytes, *, fsync: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` through :func:`atomic_file`; returns ``path``."""
    path = Path(path)
    with atomic_file(path, fsync=fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)
    return path


def describe_os_error(e: OSError) -> str:
    """A short human reason for an OSError: 'disk full (No space left on device)', 'permission denied', ..."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        return f"disk full ({reason})"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded ({reason})"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied ({reason})"
    if e.errno == errno.EROFS:
        return f"read-only file system ({reason})"
    return reason
