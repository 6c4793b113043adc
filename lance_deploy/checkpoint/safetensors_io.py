"""Safetensors reading with positioned reads only.

Why not ``safetensors.safe_open``: it memory-maps the whole file. On a 24 GB machine
mapping the 28 GB F32 Video checkpoint fails with ENOMEM (and even when it works the
page cache fills with tensors we only cast and move). Here every tensor is read with
``os.preadv`` into a fresh buffer of exactly its size, so host RAM holds one tensor
at a time. The writer lives in ``safetensors_write`` and is re-exported here.

``direct=True`` (a quantize's single pass over a source larger than RAM) reads big tensors with
``O_DIRECT``: the disk writes straight into the tensor's buffer, without a page-cache copy
to make and 25 GB of cached pages for the kernel to reclaim on 2 cores. Runtime loads keep
the page cache, which makes the next load of the same weights fast. ``pool=`` takes the buffers
from a ``BufferPool`` (``checkpoint/buffers.py``), which hands out a layer's buffers again once
the layer is gone, instead of fresh pages the kernel must zero first.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lance_deploy.checkpoint.buffers import BufferPool
from lance_deploy.checkpoint.direct_io import ALIGN, open_direct
from lance_deploy.core import jsonio
from lance_deploy.core.errors import CheckpointError

# safetensors dtype tag -> (torch dtype, item size in bytes). Only tags this torch knows.
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
for _tag, _name, _size in (("F8_E4M3", "float8_e4m3fn", 1), ("F8_E5M2", "float8_e5m2", 1),
                           ("U16", "uint16", 2), ("U32", "uint32", 4), ("U64", "uint64", 8)):
    if hasattr(torch, _name):
        _DTYPES[_tag] = (getattr(torch, _name), _size)
_TAG_OF = {dt: tag for tag, (dt, _) in _DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Same limit as the reference implementation; a larger length means a corrupt file."""

_CHUNK = 256 * 1024 * 1024  # Linux caps one read at ~2 GiB; stay well below.

DIRECT_MIN_BYTES = 1 << 20
"""Tensors from this size are read with O_DIRECT (``direct=True``); the norms and biases below it
are a few KB each, where a whole-block read would cost more than the copy it saves."""

if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
    raise ImportError("lance_deploy.checkpoint needs a little-endian host")


def torch_dtype(tag: str) -> torch.dtype:
    """Torch dtype for a safetensors dtype tag ('F32', 'BF16', ...)."""
    try:
        return _DTYPES[tag][0]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {tag!r}") from None


def dtype_tag(dtype: torch.dtype) -> str:
    """Safetensors dtype tag for a torch dtype (torch.bfloat16 -> 'BF16')."""
    try:
        return _TAG_OF[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def itemsize(tag: str) -> int:
    """Bytes per element of a safetensors dtype tag."""
    torch_dtype(tag)
    return _DTYPES[tag][1]


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one tensor; ``offset`` is absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
MAX_RANK = 8


def _entry(path: Path, name: str, e, data_start: int) -> TensorInfo:
    """One header entry, each field checked: the message names the file, tensor and field."""
    def bad(fld: str, msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt header: tensor {name!r} {fld}: {msg}")

    if not isinstance(e, dict):
        raise CheckpointError(f"{path}: corrupt header: tensor {name!r}: expected an object with "
                              f"{', '.join(_ENTRY_KEYS)}, got {type(e).__name__}")
    for k in e:
        if k not in _ENTRY_KEYS:
            raise bad(k, f"unknown field; allowed: {', '.join(_ENTRY_KEYS)}")
    for k in _ENTRY_KEYS:
        if k not in e:
            raise bad(k, "missing")
    tag, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(tag, str):
        raise bad("dtype", f"expected a dtype tag such as 'F32', got {tag!r}")
    if tag not in _DTYPES:
        raise bad("dtype", f"unsupported dtype {tag!r}; allowed: {', '.join(_DTYPES)}")
    ints = lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
    if not ints(shape) or len(shape) > MAX_RANK:
        raise bad("shape", f"expected a list of at most {MAX_RANK} non-negative integers, got {shape!r}")
    if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise bad("data_offsets", f"expected [begin, end] with 0 <= begin <= end, got {offsets!r}")
    info = TensorInfo(name, tag, tuple(shape), data_start + offsets[0], offsets[1] - offsets[0])
    need = info.numel * _DTYPES[tag][1]
    if info.nbytes != need:
        raise bad("data_offsets", f"{tag}{list(shape)} needs {need} bytes but its offsets span {info.nbytes}")
    return info


def _check_coverage(path: Path, infos: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The data offsets must tile the data section exactly: from its first byte, in order, with
    no gap and no overlap, to the end of the file (the reference implementation's rule)."""
    pos, prev = data_start, None
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):
        if info.offset < pos:
            raise CheckpointError(f"{path}: corrupt header: tensors {prev!r} and {info.name!r} overlap "
                                  f"(bytes {info.offset}..{pos - 1})")
        if info.offset > pos:
            raise CheckpointError(f"{path}: corrupt header: bytes {pos}..{info.offset - 1} are covered by no "
                                  f"tensor (before {info.name!r}); wrong header length or data offsets")
        pos, prev = info.offset + info.nbytes, info.name
    if pos > size:
        raise CheckpointError(f"{path}: truncated file: tensor {prev!r} ends at byte {pos} "
                              f"but the file has {size} bytes")
    if pos < size:
        raise CheckpointError(f"{path}: corrupt header: bytes {pos}..{size - 1} at the end of the file are "
                              "covered by no tensor; wrong header length or data offsets")


def _parse_header(path: Path, fd: int, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}")

    if size < 8:
        raise bad(f"truncated file ({size} bytes; a safetensors file starts with an 8-byte header length)")
    n = int.from_bytes(os.pread(fd, 8, 0), "little")
    if n > size - 8:
        raise bad(f"truncated file or corrupt header: header length {n} but the file has {size} bytes")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise bad(f"not a safetensors file (header length {n})")
    header = jsonio.loads(os.pread(fd, n, 8), f"{path}: corrupt header", max_bytes=MAX_HEADER_BYTES,
                          max_depth=4, error=CheckpointError)
    if not isinstance(header, dict):
        raise bad("corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("corrupt header: __metadata__ must be an object of strings")
    data_start = 8 + n
    infos = {name: _entry(path, name, e, data_start) for name, e in header.items()}
    _check_coverage(path, infos, data_start, size)
    return infos, dict(meta)


def _read_into(fd: int, buf: memoryview, offset: int, path: Path, need: int | None = None) -> None:
    """Fill `buf` from `offset`; with `need`, stop once that many bytes came (an O_DIRECT window
    rounded up past the end of the file reads short)."""
    pos, total = 0, len(buf)
    need = total if need is None else need
    while pos < need:
        want = min(_CHUNK, total - pos)
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [buf[pos:pos + want]], offset + pos)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, want, offset + pos)
            got = len(data)
            buf[pos:pos + got] = data
        if got <= 0:
            raise CheckpointError(f"{path}: truncated file (read stopped at byte {offset + pos})")
        pos += got


class SafetensorsReader:
    """Header-validated safetensors file read tensor by tensor with ``pread``.

    Opening parses and checks only the header (cheap even for 28 GB). Use as a
    context manager or call ``close()``; the file descriptor is the only resource.
    """

    def __init__(self, path: str | os.PathLike, *, direct: bool = False, pool: BufferPool | None = None):
        self.path = Path(path)
        self._direct = -1
        self._pool = pool
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found (expected a .safetensors file)") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a directory, expected a .safetensors file") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(self._fd).st_size
            self._infos, self.metadata = _parse_header(self.path, self._fd, size)
            if direct:
                self._direct = open_direct(self.path)
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        """Tensor names in header order (``__metadata__`` excluded)."""
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Dtype/shape/location of one tensor, from the header."""
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    def infos(self) -> dict[str, TensorInfo]:
        """All header entries (a copy)."""
        return dict(self._infos)

    def stored_dtypes(self) -> set[str]:
        """The set of dtype tags present, e.g. ``{'F32'}``."""
        return {i.dtype for i in self._infos.values()}

    def read(self, key: str, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor into a fresh buffer, cast to ``dtype`` and move to ``device``."""
        if self._fd < 0:
            raise CheckpointError(f"{self.path}: reader is closed")
        info = self.info(key)
        raw = self._read_direct(info) if self._direct >= 0 and info.nbytes >= DIRECT_MIN_BYTES else None
        if raw is None:
            raw = self._buffer(info.nbytes)
            if info.nbytes:
                _read_into(self._fd, memoryview(raw.numpy()).cast("B"), info.offset, self.path)
        t = raw.view(torch_dtype(info.dtype)).reshape(info.shape)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)  # cast on the host: moves fewer bytes when narrowing F32 -> BF16
        return t.to(device)

    def _read_direct(self, info: TensorInfo) -> torch.Tensor | None:
        """The tensor's bytes read with O_DIRECT: the aligned window around them goes into an
        aligned buffer, and the result is a view of it (at most 3 pages larger than the tensor).
        None where the tensor's offset does not suit its dtype, or the filesystem refuses."""
        if info.offset % itemsize(info.dtype):
            return None
        start = info.offset - info.offset % ALIGN
        length = -(-(info.offset + info.nbytes - start) // ALIGN) * ALIGN
        buf = self._buffer(length + ALIGN)
        skip = -buf.data_ptr() % ALIGN
        window = buf[skip:skip + length]
        try:
            _read_into(self._direct, memoryview(window.numpy()).cast("B"), start, self.path,
                       need=info.offset + info.nbytes - start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            os.close(self._direct)  # alignment this filesystem does not take: buffered reads from now on
            self._direct = -1
            return None
        skip = info.offset - start
        return window[skip:skip + info.nbytes]

    def _buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8) if self._pool is None else self._pool.take(nbytes)

    def close(self) -> None:
        """Close the file descriptors (idempotent)."""
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)
        fd, self._direct = getattr(self, "_direct", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsReader({str(self.path)!r}, {len(self._infos)} tensors)"


__all__ = ["SafetensorsReader", "TensorInfo", "torch_dtype", "dtype_tag", "itemsize"]
