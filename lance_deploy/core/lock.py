"""One writer per output folder: an exclusive ``flock`` on the file ``<folder>.lock`` beside it.

``quantize`` locks its artifact (which covers ``OUT.partial`` and the seal renames) and its job
folder, ``export onnx`` its export folder; a second writer is refused at once with a one-line
message naming the holder. The kernel drops a flock when its holder dies, so a lock left by a
killed run is simply taken over (``PathLock.taken_over`` keeps what the dead holder wrote). The
pid and host written inside only make the refusal readable; the flock alone decides.

The lock file is removed on release while still locked, so a waiter that opened the old file
re-checks (same inode as the path?) after locking and retries on the new one. Locks are
re-entrant within a process: ``quantize`` holds ``OUT`` and the artifact writer it calls joins.
flock is not reliable across hosts on some network filesystems; the host is recorded for that.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.fsutil import pid_alive

SUFFIX = ".lock"
_READ_RETRY_S = 1.0  # a new holder writes its pid right after locking; give it that long


class LockedError(LanceUsageError):
    """Another process is writing the same output; the message names it."""


def lock_file(target: str | os.PathLike) -> Path:
    """The lock file guarding folder ``target``: ``<target>.lock`` beside it."""
    target = Path(target)
    return target.with_name(target.name + SUFFIX)


@dataclass
class _Held:
    fd: int
    pid: int
    count: int = 1


_HELD: dict[str, _Held] = {}
_REGISTRY = threading.Lock()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _alive(rec: dict[str, Any]) -> bool:
    return rec.get("host") != socket.gethostname() or pid_alive(rec["pid"])  # another host: cannot tell


class PathLock:
    """``with PathLock(out, "--out"):`` holds the lock of ``out`` (see the module doc)."""

    def __init__(self, target: str | os.PathLike, option: str = "--out"):
        self.target, self.option = Path(target), option
        self.path = lock_file(self.target)
        self.taken_over: dict[str, Any] | None = None
        self._key = os.path.abspath(self.path)
        self._active = False

    def acquire(self) -> PathLock:
        if self._active:
            return self
        with _REGISTRY:
            held = _HELD.get(self._key)
            if held is not None and held.pid == os.getpid():  # not a lock inherited through fork
                held.count += 1
                self._active = True
                return self
        fd = self._lock()
        previous = _read(self.path)
        if previous is not None and previous["pid"] != os.getpid():
            self.taken_over = previous  # its holder died (the kernel released its flock)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        with _REGISTRY:
            _HELD[self._key] = _Held(fd, os.getpid())
        self._active = True
        return self

    def _lock(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._refusal() from None
                if _same_file(fd, self.path):
                    return fd
                os.close(fd)  # we locked a file its holder removed on release: lock the new one
        except OSError as e:
            raise LanceUsageError(f"{self.option} {self.target}: cannot lock {self.path} ({e.strerror})") from None

    def _refusal(self) -> LockedError:
        deadline = time.monotonic() + _READ_RETRY_S
        rec = _read(self.path)
        while (rec is None or not _alive(rec)) and time.monotonic() < deadline:
            time.sleep(0.05)
            rec = _read(self.path)
        head = f"{self.option} {self.target}: another lance-deploy process is writing it"
        if rec is None:
            who = f"(it has not recorded its pid in {self.path} yet)"
        elif _alive(rec):
            who = f"(pid {rec['pid']} on {rec.get('host')}, since {rec.get('since')})"
        else:
            who = (f"({self.path} names pid {rec['pid']}, which is not running; a process it started still "
                   "holds the lock)")
        return LockedError(f"{head} {who}; wait for it to finish or choose another {self.option}")

    @property
    def note(self) -> str | None:
        """One line for the user when this lock was taken over from a killed run."""
        if self.taken_over is None:
            return None
        return f"{self.target}: took over the lock of pid {self.taken_over['pid']}, which is no longer running"

    def release(self) -> None:
        if not self._active:
            return
        self._active = False
        with _REGISTRY:
            held = _HELD[self._key]
            held.count -= 1
            if held.count:
                return
            del _HELD[self._key]
        try:
            if _same_file(held.fd, self.path):
                self.path.unlink()  # still locked: a waiter that opened it retries on a new file
        finally:
            os.close(held.fd)

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # unreachable, so nobody else can release it
        if getattr(self, "_active", False):
            self.release()


def held_here(target: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``target``."""
    held = _HELD.get(os.path.abspath(lock_file(target)))
    return held is not None and held.pid == os.getpid()
