"""`core.fsutil`: verified atomic writes, output-path checks and leftovers of killed runs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lance_deploy.core import fsutil
from lance_deploy.core.errors import LanceError, LanceUsageError
from lance_deploy.core.fsutil import (
    check_output_path,
    publish,
    publish_bytes,
    remove_stale_siblings,
)


def _one_line(exc: BaseException, *needles: str) -> str:
    message = str(exc)
    assert "\n" not in message, message
    for n in needles:
        assert n in message, (n, message)
    return message


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_publish_bytes_writes_and_reads_back(tmp_path):
    path = publish_bytes(tmp_path / "a.txt", b"hello\n", what="text")
    assert path.read_bytes() == b"hello\n"
    assert path.stat().st_mode & 0o777 == 0o666 & ~fsutil._umask()  # not mkstemp's 0600
    assert _hidden(tmp_path) == []


def test_enospc_half_way_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"good" * 100)

    def half_then_full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 150)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(LanceUsageError) as err:
        publish(path, half_then_full, verify=lambda tmp: None, what="video")
    _one_line(err.value, str(path), "No space left on device", "needs more than the 150 B written", "free in",
              "unchanged")
    assert err.value.exit_code == 2
    assert path.read_bytes() == b"good" * 100
    assert _hidden(tmp_path) == []


def test_known_size_is_refused_before_writing_when_the_disk_is_too_full(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "_free_bytes", lambda folder: 10)
    with pytest.raises(LanceUsageError) as err:
        publish_bytes(tmp_path / "big.png", b"z" * 1000, what="image")
    _one_line(err.value, "big.png", "needs 1000 B", "10 B free")
    assert list(tmp_path.iterdir()) == []


def test_any_oserror_on_write_is_a_usage_error(tmp_path):
    def eio(tmp):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(LanceUsageError) as err:
        publish(tmp_path / "o.txt", eio, verify=lambda tmp: None)
    _one_line(err.value, "o.txt", "Input/output error")


def test_a_file_that_does_not_read_back_is_not_published(tmp_path):
    path = tmp_path / "keep.png"
    path.write_bytes(b"old")

    def bad(tmp):
        raise ValueError("decodes to garbage")

    with pytest.raises(LanceError) as err:
        publish(path, lambda tmp: tmp.write_bytes(b"new"), verify=bad, what="image")
    _one_line(err.value, "keep.png", "does not read back", "garbage")
    assert path.read_bytes() == b"old" and _hidden(tmp_path) == []


def test_empty_or_short_write_is_not_published(tmp_path):
    with pytest.raises(LanceError, match="0 bytes reached the disk"):
        publish(tmp_path / "e.mp4", lambda tmp: None, verify=lambda tmp: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["chardev", "fifo", "folder", "missing_folder", "link_to_devnull"])
def test_check_output_path_refuses_non_regular_files(tmp_path, kind):
    if kind == "chardev":
        path, word = Path("/dev/null"), "character device"
    elif kind == "fifo":
        path, word = tmp_path / "pipe.png", "FIFO"
        os.mkfifo(path)
    elif kind == "folder":
        path, word = tmp_path / "dir.png", "folder"
        path.mkdir()
    elif kind == "link_to_devnull":
        path, word = tmp_path / "l.png", "character device"
        path.symlink_to("/dev/null")
    else:
        path, word = tmp_path / "no" / "x.png", "does not exist"
    with pytest.raises(LanceUsageError) as err:
        check_output_path(path, "--out")
    _one_line(err.value, "--out", str(path), word)


def test_check_output_path_accepts_new_and_existing_files(tmp_path):
    assert check_output_path(tmp_path / "new.png") == tmp_path / "new.png"
    (tmp_path / "old.png").write_bytes(b"x")
    check_output_path(tmp_path / "old.png")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_siblings_of_dead_processes_are_removed(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f".x.partial-{dead}-abc").mkdir()
    (tmp_path / f".x.partial-{dead}-abc" / "graph.onnx").write_bytes(b"1")
    (tmp_path / f".x.partial-{live}-def").mkdir()
    (tmp_path / ".x.partial-nopid").mkdir()  # an old-style name: whose it is is unknown, so it stays
    (tmp_path / f".x.partialfoo-{dead}-z").mkdir()  # another prefix
    removed = remove_stale_siblings(tmp_path, ".x.partial-")
    assert [p.name for p in removed] == [f".x.partial-{dead}-abc"]
    assert _hidden(tmp_path) == sorted([f".x.partial-{live}-def", ".x.partial-nopid", f".x.partialfoo-{dead}-z"])


def test_publish_cleans_temporaries_of_killed_writers(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.png.{dead}.k3j2.tmp.png"
    stale.write_bytes(b"half")
    mine = tmp_path / ".out.png.notes"  # not a temporary name: never touched
    mine.write_bytes(b"keep")
    publish_bytes(tmp_path / "out.png", b"data")
    assert not stale.exists() and mine.exists()


def test_remove_stale_siblings_tolerates_a_missing_folder(tmp_path):
    assert remove_stale_siblings(tmp_path / "none", ".x.") == []
    shutil.rmtree(tmp_path)
