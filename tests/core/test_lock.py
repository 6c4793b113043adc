"""core/lock.py: one holder per output, refusal names it, a killed holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.lock import LockedError, PathLock, held_here, lock_file


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=60)


TRY_LOCK = """
    import sys
    from lance_deploy.core.lock import PathLock
    try:
        PathLock(sys.argv[1], "--out").acquire()
    except Exception as e:
        print(type(e).__name__, getattr(e, "exit_code", None), e)
    else:
        print("acquired")
"""


def test_second_process_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "art"
    with PathLock(out, "--out") as lock:
        assert held_here(out) and lock.taken_over is None
        rec = json.loads(lock_file(out).read_text())
        assert rec["pid"] == os.getpid() and rec["host"]
        got = _child(TRY_LOCK, str(out)).stdout.strip()
        assert got.startswith("LockedError 2 --out ") and f"(pid {os.getpid()} on " in got, got
        assert "wait for it to finish or choose another --out" in got and "\n" not in got
    assert not lock_file(out).exists() and not held_here(out)  # released and removed
    assert _child(TRY_LOCK, str(out)).stdout.strip() == "acquired"


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "art"
    child = _child("""
        import os, signal, sys
        from lance_deploy.core.lock import PathLock
        lock = PathLock(sys.argv[1]).acquire()  # kept: an unreachable lock releases itself
        print(os.getpid(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, str(out))
    assert child.returncode == -signal.SIGKILL
    dead = int(child.stdout)
    assert json.loads(lock_file(out).read_text())["pid"] == dead  # the file stays, naming a dead pid
    with PathLock(out) as lock:
        assert lock.taken_over["pid"] == dead
        assert lock.note == f"{out}: took over the lock of pid {dead}, which is no longer running"
        assert json.loads(lock_file(out).read_text())["pid"] == os.getpid()  # no misleading pid left


def test_reentrant_within_a_process(tmp_path):
    out = tmp_path / "art"
    outer = PathLock(out).acquire()
    with PathLock(out):  # the artifact writer joining quantize's lock
        assert held_here(out)
    assert held_here(out) and lock_file(out).exists()
    outer.release()
    assert not held_here(out) and not lock_file(out).exists()


def test_refusal_is_a_usage_error_and_an_unusable_folder_is_named(tmp_path):
    assert issubclass(LockedError, LanceUsageError) and LockedError.exit_code == 2
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(LanceUsageError, match=r"^--work .*file/job: cannot lock .*file/job.lock \(.+\)$"):
        PathLock(tmp_path / "file" / "job", "--work").acquire()
