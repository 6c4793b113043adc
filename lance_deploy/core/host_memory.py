"""Host memory for streaming jobs: freed blocks go back to the OS at once (glibc), so peak RSS
follows the live bytes; and big tensors sit on transparent huge pages.

glibc serves a block from an mmap of its own only above its mmap threshold, and it raises that
threshold to the size of each mmapped block freed (up to 32 MiB). After the first 16 MiB weight
is freed, every tensor below that size comes from the per-thread heaps, and a streaming job whose
reader, packer and writer threads allocate and free ~0.6 GB per layer leaves those heaps
fragmented and resident: a full-size quantize peaked at 3.20 GiB RSS against 1.82 GiB with the
threshold fixed (docs/benchmarks.md, "Memory found, packing cut").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
STREAMING_MMAP_THRESHOLD = 1 << 20  # blocks from 1 MiB up get their own mapping, unmapped when freed


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def fix_mmap_threshold(nbytes: int = STREAMING_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `nbytes` for this process (which also stops its dynamic
    raising). Returns whether it took effect; False off glibc (musl, macOS, Windows), where there
    is nothing to change."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1)


THP_ENV = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> bool:
    """Ask torch's CPU allocator for 2 MiB-aligned, huge-page-advised blocks (its `THP_MEM_ALLOC_ENABLE`)
    unless the environment says otherwise. With the mmap threshold fixed, every freed layer is
    unmapped and the next one faults its pages in again: a full-size quantize took 10.1 M page
    faults and 39.6 s of system time, against 0.9 M and 20.4 s on huge pages (wall 36.9 s -> 27.0 s
    with the files cached, same peak RSS). torch reads the variable once, at its first allocation,
    so this must run before torch is imported; returns whether it is in effect."""
    if "torch" not in sys.modules:
        os.environ.setdefault(THP_ENV, "1")
    return os.environ.get(THP_ENV) == "1"
