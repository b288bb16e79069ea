"""peagle.util.files: atomic directories and files — modes under the umask, nothing left on failure,
replacement that keeps the old version until the new one is in place, leftovers of killed writers."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import peagle.util.files as fsutil
from peagle.util.files import atomic_dir, atomic_file, clean_leftovers, leftover_of, write_atomic


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


# -- modes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), [
    (0o022, 0o755, 0o644),  # the usual umask: readable by others
    (0o077, 0o700, 0o600),  # a restrictive umask is respected, as mkdir/open respect it
    (0o002, 0o775, 0o664),
])  # fmt: skip
def test_modes_follow_the_umask_like_mkdir(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    with atomic_dir(tmp_path / "d") as tmp:
        assert _mode(tmp) == dir_mode  # already while writing, not only after the rename
        (tmp / "f.txt").write_text("x")
    assert _mode(tmp_path / "d") == dir_mode
    os.mkdir(tmp_path / "ref")
    assert _mode(tmp_path / "ref") == dir_mode  # the same as a plain mkdir
    with atomic_file(tmp_path / "g.bin") as tmp:
        assert _mode(tmp) == file_mode  # not mkstemp's 0600
    assert _mode(tmp_path / "g.bin") == file_mode
    write_atomic(tmp_path / "h.txt", "hi")
    assert _mode(tmp_path / "h.txt") == file_mode


@pytest.mark.parametrize(("mask", "private_file", "private_dir", "script"), [
    (0o022, 0o644, 0o755, 0o755),
    (0o077, 0o600, 0o700, 0o700),  # nothing beyond what the umask allows is added
    (0o027, 0o640, 0o750, 0o750),
])  # fmt: skip
def test_private_files_written_inside_get_the_umask_reads(tmp_path, umask, mask, private_file, private_dir, script):
    """Libraries that create files 0o600 whatever the umask (safetensors) do not publish unreadable files."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    umask(mask)
    with atomic_dir(tmp_path / "d") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp / "w.safetensors"))
        (tmp / "p.txt").write_text("p")
        os.chmod(tmp / "p.txt", 0o600)
        sub = Path(tempfile.mkdtemp(dir=tmp))  # 0o700
        (sub / "s.sh").write_text("#!/bin/sh\n")
        os.chmod(sub / "s.sh", 0o700)
        os.symlink("p.txt", tmp / "link")
    d = tmp_path / "d"
    assert _mode(d / "w.safetensors") == private_file
    assert _mode(d / "p.txt") == private_file
    assert _mode(d / sub.name) == private_dir
    assert _mode(d / sub.name / "s.sh") == script  # exec bits kept, read bits added
    assert os.readlink(d / "link") == "p.txt"
    with atomic_file(tmp_path / "f.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert _mode(tmp_path / "f.safetensors") == private_file


def test_no_permission_is_removed(tmp_path, umask):
    umask(0o077)
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "shared.txt").write_text("s")
        os.chmod(tmp / "shared.txt", 0o664)  # more open than the umask: the writer chose it
    assert _mode(tmp_path / "d" / "shared.txt") == 0o664


def test_checkpoint_dir_readable_by_others(tmp_path, umask):
    import torch

    from peagle.store.checkpoint import TrainState, capture_rng, save_checkpoint

    umask(0o022)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, TrainState(step=7), model=model, optimizer=opt,
                           rng_states=[capture_rng()], config={})
    assert path == tmp_path / "step-00000007"
    dirs = [path, *(p for p in path.rglob("*") if p.is_dir())]
    files = [p for p in path.rglob("*") if p.is_file()]
    assert {p.name for p in dirs} == {"step-00000007", "draft"}
    assert len(files) == 6  # model.safetensors, optimizer.pt, rng.pt, trainer_state.json, config.yaml, COMPLETE
    assert {_mode(p) for p in dirs} == {0o755}
    assert {_mode(p) for p in files} == {0o644}
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000007"]


def test_prepared_dataset_readable_by_others(tmp_path, umask, chat_jsonl, chat_tokenizer_dir):
    from peagle.data import prepare

    umask(0o022)
    out = prepare(chat_jsonl, chat_tokenizer_dir, tmp_path / "prep", progress=False).output_dir
    assert Path(out) == tmp_path / "prep"
    entries = [Path(out), *Path(out).rglob("*")]
    assert len(entries) > 4
    assert {_mode(p) for p in entries if p.is_dir()} == {0o755}
    assert all(_mode(p) & 0o044 == 0o044 for p in entries if p.is_file())  # group and others can read
    assert [p.name for p in tmp_path.iterdir()] == ["prep"]


# -- atomic_dir --------------------------------------------------------------------------------------


def test_success_renames_into_place_nothing_else_left(tmp_path):
    dest = tmp_path / "sub" / "out"  # the parent is created
    with atomic_dir(dest) as tmp:
        assert tmp.parent == dest.parent and leftover_of(tmp.name)[0] == "out"
        assert not dest.exists()  # invisible until the block ends
        (tmp / "a.txt").write_text("A")
        (tmp / "deep").mkdir()
        (tmp / "deep" / "b.txt").write_text("B")
    assert _tree(dest) == {"a.txt": "A", "deep/b.txt": "B"}
    assert [p.name for p in dest.parent.iterdir()] == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing(tmp_path, exc):
    (tmp_path / "other").write_text("kept")
    with pytest.raises(exc):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 100)
            raise exc()
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_existing_dest_refused_without_replace(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("old")
    entered = []
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(tmp_path / "out"):
            entered.append(True)
    assert entered == []  # refused before anything was written
    assert _tree(tmp_path / "out") == {"a.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_dest_appearing_while_writing_is_not_replaced(tmp_path):
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("new")
            (tmp_path / "out").mkdir()  # e.g. another process; an empty dir would be silently replaced
    assert list((tmp_path / "out").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_swaps_whole_directory(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    (dest / "only_old.txt").write_text("x")
    with atomic_dir(dest, replace=True) as tmp:
        assert _tree(dest) == {"a.txt": "old", "only_old.txt": "x"}  # the old one stays until the end
        (tmp / "a.txt").write_text("new")
    assert _tree(dest) == {"a.txt": "new"}  # not merged: the old directory is gone
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .out.old-* left


def test_replace_keeps_old_when_the_block_fails(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(dest, replace=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise ValueError("boom")
    assert _tree(dest) == {"a.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_restores_old_when_the_final_rename_fails(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if ".tmp-" in Path(src).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(dest, replace=True) as tmp:
            (tmp / "a.txt").write_text("new")
    (aside_src, aside), (new, new_dst), back = calls  # moved aside, new one refused, moved back
    assert aside_src == "out" and leftover_of(aside) == ("out", "old")
    assert leftover_of(new) == ("out", "tmp") and new_dst == "out"
    assert back == (aside, "out")
    assert _tree(dest) == {"a.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_fsync_flushes_files_dirs_then_parent_after_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str, bool]] = []
    dest = tmp_path / "out"
    monkeypatch.setattr(fsutil, "_fsync_file", lambda p: events.append(("file", Path(p).name, dest.exists())))
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: events.append(("dir", Path(p).name, dest.exists())))
    with atomic_dir(dest, fsync=True) as tmp:
        (tmp / "a.txt").write_text("A")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("B")
        tmp_name = tmp.name
    assert events == [
        ("file", "a.txt", False),
        ("file", "b.txt", False),
        ("dir", "sub", False),  # deepest first
        ("dir", tmp_name, False),
        ("dir", tmp_path.name, True),  # the parent, once the rename is done
    ]
    events.clear()
    with atomic_dir(tmp_path / "nofsync") as tmp:
        (tmp / "a.txt").write_text("A")
    assert events == []


def test_killed_writer_leaves_only_a_hidden_temp(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from peagle.util.files import atomic_dir
        with atomic_dir({str(tmp_path / "out")!r}) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            print("WRITING", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "WRITING" in proc.stdout.readline()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (left,) = tmp_path.iterdir()
    assert leftover_of(left.name) == ("out", "tmp") and not (tmp_path / "out").exists()
    assert clean_leftovers(tmp_path) == [left.name]
    assert list(tmp_path.iterdir()) == []


# -- atomic_file / write_atomic ----------------------------------------------------------------------


def test_atomic_file_replaces_or_keeps(tmp_path):
    dest = tmp_path / "f.json"
    dest.write_text("old")
    with atomic_file(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.is_file() and tmp.read_text() == ""
        tmp.write_text("new")
        assert dest.read_text() == "old"
    assert dest.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_file(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert dest.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(IsADirectoryError):
        with atomic_file(tmp_path):
            pass


def test_write_atomic_text_and_bytes(tmp_path, monkeypatch):
    assert write_atomic(tmp_path / "a" / "t.txt", "héllo\n") == tmp_path / "a" / "t.txt"
    assert (tmp_path / "a" / "t.txt").read_bytes() == "héllo\n".encode()
    write_atomic(tmp_path / "a" / "t.txt", b"\x00\x01")
    assert (tmp_path / "a" / "t.txt").read_bytes() == b"\x00\x01"
    synced = []
    monkeypatch.setattr(fsutil, "_fsync_file", lambda p: synced.append(Path(p).read_bytes()))
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: synced.append(Path(p).name))
    write_atomic(tmp_path / "a" / "t.txt", b"z", fsync=True)
    assert synced == [b"z", "a"]  # the complete file before the rename, then its directory
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["t.txt"]


# -- leftovers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    (".step-00000002.tmp-0a1b2c3d4e5f6071", ("step-00000002", "tmp")),
    (".final.old-" + "f" * 32, ("final", "old")),  # draft.save_pretrained's uuid4().hex names
    (".shard_00002.safetensors.tmp-12345", ("shard_00002.safetensors", "tmp")),  # older cache.py: pid
    ("step-00000002.tmp", None),
    (".out.tmp-", None),
    (".out.tmp-XYZ", None),
    (".out.new-abc", None),
    ("out.tmp-abc", None),
])  # fmt: skip
def test_leftover_of(name, expected):
    assert leftover_of(name) == expected


def test_clean_leftovers(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cur.txt").write_text("current")
    (tmp_path / ".a.tmp-01").mkdir()  # a killed write: removed
    (tmp_path / ".a.old-02").mkdir()  # a swap that was complete but for removing the old one: removed
    (tmp_path / ".b.old-03").mkdir()  # killed between the two renames of a swap: b is restored
    (tmp_path / ".b.old-03" / "prev.txt").write_text("previous")
    (tmp_path / ".b.tmp-04").write_text("partial file")  # an atomic_file temp
    (tmp_path / ".c.tmp-05").mkdir()  # not selected by the glob: kept
    (tmp_path / "unrelated.tmp").mkdir()
    assert clean_leftovers(tmp_path, "[ab]") == [".a.old-02", ".a.tmp-01", ".b.old-03", ".b.tmp-04"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.tmp-05", "a", "b", "unrelated.tmp"]
    assert _tree(tmp_path / "a") == {"cur.txt": "current"}
    assert _tree(tmp_path / "b") == {"prev.txt": "previous"}
    assert clean_leftovers(tmp_path / "missing") == []
