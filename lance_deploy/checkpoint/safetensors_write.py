"""Streaming, atomic safetensors writer.

The header is computed up front from (name, dtype, shape), so tensors can be
produced and written one at a time: writing the 28 GB Video checkpoint needs RAM
for one tensor, not for the file. Output follows the format exactly (8-byte
little-endian header length, JSON header padded with spaces to an 8-byte
boundary, tensor bytes back to back) and opens with ``safetensors.safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from lance_deploy.checkpoint.direct_io import DirectWrites, open_direct
from lance_deploy.checkpoint.safetensors_io import dtype_tag, itemsize
from lance_deploy.core.errors import CheckpointError

_CHUNK = 64 * 1024 * 1024


def _normalise_dtype(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return dtype_tag(dtype)
    itemsize(dtype)  # validates the tag
    return dtype


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, atomically.

    ``entries`` fixes the file content: ``(name, dtype, shape)`` with dtype a tag
    ('F32', 'BF16', ...) or a torch dtype. Data is laid out in that order. Call
    ``write(name, tensor)`` once per entry (any order; positioned writes), then
    ``close()`` - or use ``with`` - which fsyncs and renames the temporary file
    into place. On an exception inside ``with``, or when entries are left
    unwritten, the temporary file is removed and nothing appears at ``path``.

    ``resumable=True`` (a quantizer's artifact shards): the temporary file has a fixed name
    (``.NAME.part``) and is kept by ``abort``, so a killed writer's bytes survive; a new writer
    with the same entries reopens it (a finished ``path`` is moved back first), ``resumed`` says
    so, and ``adopt(name)`` takes a tensor already in it instead of writing it again. ``sync()``
    makes what was written durable.

    ``direct=True`` (a quantizer's 9 GB of shards): the bytes go out through O_DIRECT, gathered in
    an aligned buffer (``direct_io.py``), where the filesystem allows it.
    """

    def __init__(self, path: str | os.PathLike, entries: Iterable[tuple[str, str | torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, hash_file: bool = True, resumable: bool = False,
                 direct: bool = False):
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata is not None:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        pos = 0
        for name, dtype, shape in entries:
            if name in self._layout or name == "__metadata__":
                raise CheckpointError(f"{self.path}: duplicate or reserved tensor name {name!r}")
            tag, shape = _normalise_dtype(dtype), tuple(int(d) for d in shape)
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * itemsize(tag)
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self._layout[name] = (tag, shape, pos, nbytes)
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the format wants the data to start 8-byte aligned
        self._data_start = 8 + len(raw)
        self.total_bytes = self._data_start + pos
        self._written: set[str] = set()
        # sha256 of the file while it is written in order, so a caller need not read it back
        # (`hash_file=False` where nobody reads it: one sha256 pass less per byte written)
        self._hash: hashlib._Hash | None = (hashlib.sha256(len(raw).to_bytes(8, "little") + raw) if hash_file
                                            else None)
        self._hashed = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.resumable = resumable
        head = len(raw).to_bytes(8, "little") + raw
        if resumable:
            self._tmp = self.path.with_name(f".{self.path.name}.part")
            if self.path.exists() and not self._tmp.exists():
                os.replace(self.path, self._tmp)  # a finished shard of an unsealed artifact: reopened
            self.resumed = self._tmp.is_file() and _starts_with(self._tmp, head)
        else:
            self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            self.resumed = False
        flags = os.O_RDWR | os.O_CREAT | (0 if self.resumed else os.O_TRUNC)
        self._fd = os.open(self._tmp, flags, 0o644)
        self._direct: DirectWrites | None = None
        try:
            dfd = open_direct(self._tmp, write=True) if direct else -1
            if dfd >= 0:
                self._direct = DirectWrites(self._fd, dfd)
            if not self.resumed:
                self._pwrite(head, 0)
        except BaseException:
            self.abort()
            raise

    def _pwrite(self, data, offset: int) -> None:
        if self._direct is not None:
            self._direct.write(data, offset)
            return
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:done + _CHUNK], offset + done)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one declared tensor; its dtype and shape must match the declaration."""
        if self._fd < 0:
            raise CheckpointError(f"{self.path}: writer is closed")
        if name not in self._layout:
            raise CheckpointError(f"{self.path}: tensor {name!r} was not declared")
        if name in self._written:
            raise CheckpointError(f"{self.path}: tensor {name!r} written twice")
        tag, shape, pos, nbytes = self._layout[name]
        if dtype_tag(tensor.dtype) != tag or tuple(tensor.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {dtype_tag(tensor.dtype)}{list(tensor.shape)}, "
                                  f"declared {tag}{list(shape)}")
        if nbytes:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self._pwrite(flat, self._data_start + pos)
            if self._hash is not None and pos == self._hashed:
                self._hash.update(flat)
                self._hashed += nbytes
            else:
                self._hash = None  # out of order: no digest
        self._written.add(name)

    def adopt(self, name: str) -> bytes:
        """Take declared tensor `name` as already in the reopened file (a resumed writer); returns
        its bytes, for the caller to check against what it recorded when it wrote them."""
        if not self.resumed:
            raise CheckpointError(f"{self.path}: nothing to adopt {name!r} from (the file was not reopened)")
        if name not in self._layout or name in self._written:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not declared, or already written")
        _, _, pos, nbytes = self._layout[name]
        data = os.pread(self._fd, nbytes, self._data_start + pos) if nbytes else b""
        if len(data) != nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} is cut short in the reopened file")
        self._hash = None  # the file digest covers bytes written in order by this writer only
        self._written.add(name)
        return data

    def sync(self) -> None:
        """Make every byte written so far durable (a resumable writer's progress point)."""
        if self._fd >= 0:
            if self._direct is not None:
                self._direct.flush()
            os.fdatasync(self._fd)  # per file: covers the O_DIRECT writes too

    @property
    def sha256(self) -> str | None:
        """Hex sha256 of the whole file once every tensor was written in declared order, else None."""
        if self._hash is None or self.pending or self._hashed != self.total_bytes - self._data_start:
            return None
        return self._hash.hexdigest()

    @property
    def pending(self) -> list[str]:
        """Declared tensors not written yet."""
        return [n for n in self._layout if n not in self._written]

    def close(self) -> None:
        """Finish: fsync, rename into place, fsync the directory. Raises if entries are missing."""
        if self._fd < 0:
            return
        missing = self.pending
        if missing:
            self.abort()
            raise CheckpointError(f"{self.path}: {len(missing)} declared tensors were never written "
                                  f"(first: {missing[0]!r}); file not created")
        try:
            if self._direct is not None:
                self._direct.close()
                self._direct = None
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
        os.replace(self._tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        """Drop the temporary file (a resumable writer keeps it); nothing is created at ``path``."""
        if self._direct is not None:  # staged bytes were never synced: a resume does not count on them
            self._direct.close(flush=False)
            self._direct = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.resumable:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.abort()


def _starts_with(path: Path, head: bytes) -> bool:
    """Whether the file at `path` begins with `head` (same header: same entries, same layout)."""
    with open(path, "rb") as f:
        return f.read(len(head)) == head
