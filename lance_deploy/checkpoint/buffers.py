"""Host buffers that a streaming read hands out again once nothing uses them.

A quantize reads 25 GB through fresh buffers, and the kernel zeroes every page of each before the
read overwrites it. On the 2-core VM of docs/benchmarks.md that zeroing (``clear_page``) was 43 %
of a full-size quantize's CPU time: freed memory goes back to the host and comes back cold.
Each decoder layer has the same tensor shapes, so after the first layers every read finds an idle
buffer of its size.

A buffer is idle when no tensor shares its storage any more (the storage's use count), so a
buffer still referenced anywhere (a view, a Parameter, a numpy array of it) is never reused.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

SIZE_UNIT = 1 << 20  # buffers are kept in whole MiB, so the same tensor shape always finds its size


def _uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class BufferPool:
    """uint8 host buffers for `take(nbytes)`, recycled when idle; at most `idle_bytes` of idle
    buffers are kept (the oldest are freed first), so peak RSS grows by that much at most."""

    def __init__(self, idle_bytes: int):
        self.idle_bytes = idle_bytes
        self._buffers: OrderedDict[int, torch.Tensor] = OrderedDict()  # id -> buffer, oldest first
        self._alone = -1  # a buffer's use count when only the pool holds it
        self.reused = self.allocated = 0
        self._lock = threading.Lock()  # a reader thread takes; other threads only drop tensors

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` (a view of a pooled buffer): an idle buffer of its size, or a new one."""
        with self._lock:
            return self._take(nbytes)

    def _take(self, nbytes: int) -> torch.Tensor:
        size = -(-max(nbytes, 1) // SIZE_UNIT) * SIZE_UNIT
        for key, buf in self._buffers.items():
            if buf.numel() == size and self._idle(buf):
                self._buffers.move_to_end(key)
                self.reused += 1
                return buf[:nbytes]
        buf = torch.empty(size, dtype=torch.uint8)
        if self._alone < 0:
            self._alone = _uses(buf)
        self._trim(self.idle_bytes)
        self._buffers[id(buf)] = buf
        self.allocated += 1
        return buf[:nbytes]

    def _idle(self, buf: torch.Tensor) -> bool:
        return _uses(buf) == self._alone

    def idle(self) -> int:
        """Bytes of the buffers nothing uses now."""
        with self._lock:
            return sum(b.numel() for b in self._buffers.values() if self._idle(b))

    def _trim(self, keep: int) -> None:
        idle = [(k, b) for k, b in self._buffers.items() if self._idle(b)]
        total = sum(b.numel() for _, b in idle)
        for key, buf in idle:  # oldest first
            if total <= keep:
                break
            total -= buf.numel()
            del self._buffers[key]
