"""Atomic file writes: a half-written output never replaces a good one."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from lance_deploy.core.errors import LanceError, LanceUsageError
from lance_deploy.core.units import MiB, format_bytes


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- verified outputs


def check_output_path(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before any work, a destination that is not (or cannot become) a regular file:
    a device such as /dev/null, a FIFO, a socket or a folder, or one in a missing or read-only folder."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows links: a link to /dev/null is /dev/null
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise LanceUsageError(f"{option} {path}: cannot be used ({e.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise LanceUsageError(f"{option} {path} is {kind}; give the path of a regular file to write")
    folder = path.parent
    if not folder.is_dir():
        raise LanceUsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LanceUsageError(f"{option} {path}: the folder {folder} is not writable")
    return path


def publish(path: str | os.PathLike, write: Callable[[Path], None], *, verify: Callable[[Path], None],
            what: str = "file", size: int | None = None, overwrite: bool = True) -> Path:
    """Write `path` so that a good earlier file is never replaced by a broken one.

    `write(tmp)` fills a temporary file beside `path` (same folder, same suffix: ffmpeg picks
    the container from it); its size is checked (== `size` when known, else non-empty),
    `verify(tmp)` reads it back and raises if it is not what was meant, then it is fsynced and
    renamed over `path`. An OSError anywhere (ENOSPC, EIO, EDQUOT, ...) is one LanceUsageError
    naming the path and the bytes it needed; a failed read-back is a LanceError. Either way
    `path` is left as it was and the temporary file is removed. With `overwrite=False` the file is
    linked into place instead, so an existing `path` (even one made a moment earlier by another
    process) is never replaced: FileExistsError, and the caller picks another name.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise LanceUsageError(f"cannot write {what} {path}: the folder {folder} does not exist")
    if size is not None and size > _free_bytes(folder):  # refuse before touching the disk
        raise _write_error(path, what, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), size, exact=True)
    remove_stale_siblings(folder, f".{path.name}.", ".tmp" + path.suffix)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + path.suffix, dir=folder)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an output gets the usual mode
        write(tmp)
        written = tmp.stat().st_size
        if written == 0 or (size is not None and written != size):
            expected = "" if size is None else f" of {size}"
            raise LanceError(f"cannot write {what} {path}: {written}{expected} bytes reached the disk")
        try:
            verify(tmp)
        except Exception as e:
            if _free_bytes(folder) < max(written, MiB):  # a full disk can cut a file short without an error
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (it does not read back)") from e
            raise LanceError(f"cannot write {what} {path}: it does not read back ({_first_line(e)})") from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            tmp = None
        else:
            _link_new(tmp, path)
        _fsync_dir(folder)
    except FileExistsError:
        raise
    except OSError as e:
        written = tmp.stat().st_size if tmp is not None and tmp.exists() else 0
        raise _write_error(path, what, e, size if size is not None else written, exact=size is not None) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


def publish_bytes(path: str | os.PathLike, data: bytes, *, what: str = "file",
                  verify: Callable[[Path], None] | None = None, overwrite: bool = True) -> Path:
    """`publish` for content already in memory: exact size known up front, read back byte for byte."""
    def check(tmp: Path) -> None:
        if tmp.read_bytes() != data:
            raise ValueError("the bytes on disk differ from the bytes written")
        if verify is not None:
            verify(tmp)

    return publish(path, lambda tmp: tmp.write_bytes(data), verify=check, what=what, size=len(data),
                   overwrite=overwrite)


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if no file has it (a hard link is atomic and refuses an existing
    name; the caller drops the temporary name). Where links are not supported, check, then rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)


def _write_error(path: Path, what: str, err: OSError, needed: int, *, exact: bool) -> LanceUsageError:
    folder = path.parent if str(path.parent) else Path(".")
    reason = err.strerror or _first_line(err) or type(err).__name__
    need = f"needs {format_bytes(needed)}" if exact else f"needs more than the {format_bytes(needed)} written"
    kept = f"; the existing {path.name} is unchanged" if path.exists() else ""
    return LanceUsageError(f"cannot write {what} {path}: {reason} ({need}, {format_bytes(_free_bytes(folder))} "
                           f"free in {folder}){kept}")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (not every filesystem lets a folder be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask now (a later os.umask counts). Linux reports it in /proc without changing
    it; elsewhere it can only be read by setting it, briefly, and back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split())[:300] if text else type(exc).__name__


# --------------------------------------------------------------------------- leftovers of killed runs

_PID_FIELD = re.compile(r"(\d+)[.-]")


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # unknown: keep the leftover
    return True


def remove_stale_siblings(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove entries of `folder` named `<prefix><pid>.…<suffix>` or `<prefix><pid>-…<suffix>`
    (temporary files and folders whose name records the writing process) whose process is gone.
    Entries of live processes, and names without a pid, are left alone. Returns what was removed."""
    removed = []
    try:
        entries = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)]
    except OSError:
        return removed
    for p in entries:
        m = _PID_FIELD.match(p.name, len(prefix))
        if m is None or pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed
