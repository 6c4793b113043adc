"""O_DIRECT: its descriptors, and positioned writes gathered in one page-aligned staging buffer.

(The reads are ``SafetensorsReader(direct=True)``'s: an aligned window into an aligned buffer.)

A quantize writes a 9 GB artifact. Through the page cache, each byte is first copied into a fresh
cache page; on the 2-core VM of docs/benchmarks.md that copy was 39 % of a full-size quantize's
CPU time (``copy_folio_from_iter_atomic``), since fresh pages come back cold from the host.
O_DIRECT wants block-aligned offsets, lengths and addresses, and a safetensors file's tensors sit
at any byte, so the writes are gathered here: consecutive bytes fill the buffer, whole blocks go
out through O_DIRECT, and the last partial block goes through the page cache when the caller
syncs (and stays staged, so the next writes complete it). A write elsewhere in the file starts a
new run whose first partial block is read back from the file first.
"""

from __future__ import annotations

import errno
import mmap
import os

ALIGN = 4096  # offset, length and address unit: a page covers every common logical block size
STAGE_BYTES = 16 << 20


def open_direct(path: os.PathLike, *, write: bool = False) -> int:
    """An O_DIRECT descriptor of the existing file `path` (read-only, or write-only), or -1 where
    the platform or the filesystem has none (tmpfs, some FUSE mounts)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | flag)
    except OSError:
        return -1


class DirectWrites:
    """Writes to one file: `fd` (buffered, read-write) for reads and partial blocks, `direct_fd`
    (O_DIRECT) for whole blocks. `flush()` puts every staged byte in the file."""

    def __init__(self, fd: int, direct_fd: int, stage_bytes: int | None = None):
        self.fd, self.direct_fd = fd, direct_fd
        self._stage = mmap.mmap(-1, stage_bytes or STAGE_BYTES)  # anonymous maps are page-aligned
        self._view = memoryview(self._stage)
        self._base = 0  # file offset of the stage's first byte (aligned)
        self._fill = 0  # staged bytes from _base

    def write(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        if offset != self._base + self._fill or not self._fill:
            self.flush()
            self._start(offset)
        done = 0
        while done < view.nbytes:
            n = min(view.nbytes - done, len(self._stage) - self._fill)
            self._view[self._fill:self._fill + n] = view[done:done + n]
            self._fill += n
            done += n
            if self._fill == len(self._stage):
                self._out(self._fill)

    def flush(self) -> None:
        """Write the staged bytes: whole blocks through O_DIRECT, the partial last block buffered
        (it stays staged, for the next consecutive write to complete)."""
        whole = self._fill - self._fill % ALIGN
        if whole:
            self._out(whole)
        if self._fill:
            _pwrite_all(self.fd, self._view[:self._fill], self._base)

    def close(self, *, flush: bool = True) -> None:
        """Flush (unless dropping what is staged, as an abort does) and free the buffer."""
        if flush:
            self.flush()
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        self._view.release()
        self._stage.close()

    def _start(self, offset: int) -> None:
        """A new run at `offset`: the bytes of its first block before it come from the file."""
        self._base, head = offset - offset % ALIGN, offset % ALIGN
        got = os.preadv(self.fd, [self._view[:head]], self._base) if head else 0
        self._view[got:head] = bytes(head - got)  # past the end of the file: zeros, as a hole reads
        self._fill = head

    def _out(self, n: int) -> None:
        """Write the first `n` staged bytes (whole blocks) and move the rest to the front."""
        if self.direct_fd >= 0:
            try:
                _pwrite_all(self.direct_fd, self._view[:n], self._base)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.direct_fd)  # this filesystem wants other alignment: buffered from now on
                self.direct_fd = -1
        if self.direct_fd < 0:
            _pwrite_all(self.fd, self._view[:n], self._base)
        rest = self._fill - n
        self._view[:rest] = self._view[n:self._fill]
        self._base += n
        self._fill = rest


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)
