"""Let go of the pages of a memory-mapped checkpoint tensor once it has been copied.

`torch.load(mmap=True)` maps the whole VAE file privately; every page a copy touches stays in
the process's resident set until the mapping goes, so streaming the 2.8 GB release VAE would
leave ~2.8 GB resident. madvise(MADV_DONTNEED) on a private, unmodified file mapping drops the
pages; a later read simply faults them in from the file again.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4


def drop_file_pages(t: torch.Tensor) -> None:
    """Release the resident pages under `t`'s storage (must be a read-only file mapping)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return
    storage = t.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    if size == 0:
        return
    page = mmap.PAGESIZE
    lo = start // page * page
    hi = -(-(start + size) // page) * page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_DONTNEED))
