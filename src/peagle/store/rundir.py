"""Output paths and run directories: usable-destination checks, the run lock, what peagle wrote.

peagle never deletes or overwrites what it did not write. Every command that writes a directory
checks its destination first (:func:`check_output_dir`, :func:`check_output_file`), so a path that
names a file, lies under a file, or cannot be written is one clear error before any work starts.
A training run holds an exclusive ``fcntl`` lock on ``<output_dir>/.peagle.lock`` (:class:`RunLock`)
for its whole life: a second run on the same directory refuses, naming the holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from peagle.model.config import is_peagle_config
from peagle.util.files import describe_os_error, leftover_of

__all__ = [
    "FINAL_DIR",
    "LOCK_FILE",
    "METRICS_FILE",
    "REPORT_FILE",
    "RUN_FILES",
    "check_run_dir",
    "OutputPathError",
    "RunLock",
    "RunLockError",
    "check_output_dir",
    "check_output_file",
    "describe_entries",
    "EXPORT_FILES",
    "is_previous_export",
    "foreign_entries",
]

LOCK_FILE = ".peagle.lock"
FINAL_DIR = "final"  # the export written at the end of training
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.md"
# What a run writes into train.output_dir besides step-XXXXXXXX/ checkpoints (a fresh run refuses
# a directory holding anything else: it never writes over files it did not create).
RUN_FILES = frozenset(
    {"config.yaml", METRICS_FILE, "tensorboard", FINAL_DIR, REPORT_FILE, LOCK_FILE,
     "loss.png", "depth_accuracy.png", "al_during_training.png"}
)


class OutputPathError(ValueError):
    """A destination that cannot be used (a file where a directory is needed, unwritable, foreign content)."""


class RunLockError(ValueError):
    """Another process holds the run directory's lock."""



def _existing_ancestor(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")  # pragma: no cover - "/" always exists


def _check_parent_chain(path: Path, what: str) -> None:
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        raise OutputPathError(f"{what} {path} is under {anc}, which is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: cannot create it, {anc} is not writable")


def check_output_dir(path: str | Path, what: str) -> Path:
    """``path`` if it is (or can be created as) a writable directory, else :class:`OutputPathError`.

    ``what`` names the option in the message (e.g. ``"train.output_dir"``, ``"--out"``).
    Creates nothing.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise OutputPathError(f"{what} {p} is a file, not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputPathError(f"{what} {p} is not writable")
        return p
    if p.is_symlink():
        raise OutputPathError(f"{what} {p} is a broken symbolic link")
    _check_parent_chain(p, what)
    return p


def check_output_file(path: str | Path, what: str) -> Path:
    """``path`` if a file can be written there (not a directory, parent usable), else :class:`OutputPathError`."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{what} {p} is a directory, not a file")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise OutputPathError(f"{what} {p} is not writable")
        return p
    parent = p.absolute().parent
    if parent.exists():
        if not parent.is_dir():
            raise OutputPathError(f"{what} {p} is under {parent}, which is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputPathError(f"{what} {p}: cannot create it, {parent} is not writable")
        return p
    _check_parent_chain(p, what)
    return p


def describe_entries(names: Iterable[str], root: Path, limit: int = 5) -> str:
    """``"model/, a.txt, … and 3 more"``: the first ``limit`` names, directories (with a slash) first,
    hidden names last."""
    names = sorted(names, key=lambda n: (n.startswith("."), not (root / n).is_dir(), n))
    shown = [n + ("/" if (root / n).is_dir() else "") for n in names[:limit]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", … and {more} more" if more > 0 else "")


def foreign_entries(directory: str | Path, owned: Callable[[str], bool]) -> list[str]:
    """Names in ``directory`` that ``owned(name)`` does not claim (empty when it does not exist)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not owned(p.name))


# ---------------------------------------------------------------------------------------------
# the run lock


class RunLock:
    """Exclusive advisory lock on ``<directory>/.peagle.lock`` (``fcntl.flock``), released on exit.

    The lock file holds the holder's pid, host, start time and command line (JSON). The kernel
    releases the lock when the holder dies, however it dies, so a stale file never blocks a run.
    """

    def __init__(self, directory: str | Path, what: str = "train.output_dir") -> None:
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory if needed) or raise :class:`RunLockError`."""
        check_output_dir(self.directory, self.what)
        if not self.directory.exists():
            try:
                self.directory.mkdir(parents=True)
            except FileExistsError:
                pass
            except OSError as e:
                raise OutputPathError(self._where(f"cannot create it: {describe_os_error(e)}")) from None
            else:
                self._created_dir = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputPathError(self._where(f"cannot create {LOCK_FILE}: {describe_os_error(e)}")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(
                    f"{self.what} {self.directory} is in use by another peagle run ({self.holder()}); "
                    f"wait for it to finish, stop it, or choose another {self.what}"
                ) from None
            raise OutputPathError(self._where(f"cannot lock {LOCK_FILE}: {describe_os_error(e)}")) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "started_unix": time.time(),
            "argv": sys.argv,
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise OutputPathError(self._where(f"cannot write {LOCK_FILE}: {describe_os_error(e)}")) from None
        self._fd = fd
        return self

    def _where(self, text: str) -> str:
        return f"{self.what} {self.directory}: {text}"

    def holder(self) -> str:
        """'pid 123 on host, started 2024-01-01 12:00:00 UTC' from the lock file (best effort)."""
        try:
            info: dict[str, Any] = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info.get("pid"):
            return "holder unknown: it is starting up"
        return f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}"

    def release(self) -> None:
        """Drop the lock; a directory this lock created and nothing else wrote into is removed again."""
        if self._fd is None:
            return
        try:
            if self._created_dir and [p.name for p in self.directory.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                self.directory.rmdir()
        except OSError:  # pragma: no cover - best effort
            pass
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _owned_by_run(name: str) -> bool:
    """Whether ``name`` (an entry of train.output_dir) is something a peagle run writes."""
    leftover = leftover_of(name)  # a temporary of an atomic write (peagle.util.files)
    return (
        name in RUN_FILES
        or re.fullmatch(r"step-\d+(\.tmp|\.replaced)?", name) is not None  # older peagle's temporaries
        or (leftover is not None and (leftover[0] == FINAL_DIR or re.fullmatch(r"step-\d+", leftover[0]) is not None))
    )


def check_run_dir(out: Path, has_checkpoints: bool) -> None:
    """A fresh run refuses a directory holding what it did not write; ``final/`` must be an export."""
    if not has_checkpoints:
        foreign = foreign_entries(out, _owned_by_run)
        if foreign:
            raise OutputPathError(
                f"train.output_dir {out} is not empty and is not a peagle run directory (it holds "
                f"{describe_entries(foreign, out)}); choose a new or empty directory"
            )
    final = out / FINAL_DIR
    if final.exists() and not (final.is_dir() and (not any(final.iterdir()) or is_previous_export(final))):
        what = describe_entries([p.name for p in final.iterdir()], final) if final.is_dir() else "a file"
        raise OutputPathError(
            f"train.output_dir {out}: {final} is not a peagle export ({what}); the export at the end of "
            "training would replace it: move it away first"
        )

EXPORT_FILES = ("config.json", "model.safetensors")  # everything an export writes


def is_previous_export(path: str | Path) -> bool:
    """True when ``path`` holds exactly what an export writes: a P-EAGLE config.json + model.safetensors."""
    path = Path(path)
    if not path.is_dir() or sorted(p.name for p in path.iterdir()) != sorted(EXPORT_FILES):
        return False
    if not (path / "model.safetensors").is_file():
        return False
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return is_peagle_config(raw)
