"""The one seam between the runtime and host<->device copies, streams, events and pinned memory.

The pager and the residency manager never call `torch.cuda.Stream`, `Event`, `pin_memory` or
`copy_(non_blocking=...)` themselves; they ask a `CopyEngine`:

    host_copy(t)           a host copy of t to stream from (pinned on CUDA), or t itself
    to_device(host)        a fresh device copy (async from pinned memory on CUDA)
    copy_into(dst, src)    dst.copy_(src), async where it can be
    side_stream()          a second stream for prefetch copies (None where there is none)
    using(stream)          run the enclosed calls on `stream` (a no-op for None)
    record(stream)         an event after what `stream` (default: the current one) has queued
    wait(event, stream)    make `stream` (default: current) wait for `event`
    wait_stream(stream)    make the current stream wait for everything queued on `stream`

`SyncEngine` (CPU, or any device without streams) copies in place and has no events;
`CudaEngine` is the real thing; `runtime.fake_cuda.FakeCudaEngine` keeps vector clocks
instead, so the rehearsal can check the pager's stream protocol at release shapes without a
GPU. `engine_for(device)` picks one; a rehearsal installs its own with `use_engine`.
"""

from __future__ import annotations

import contextlib

import torch


class SyncEngine:
    """Synchronous copies on one implicit stream (the CPU runtime, and tests)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device.type == "cpu" else t.cpu()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.copy_into(dev, host)
        return dev

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def side_stream(self):
        return None

    def using(self, stream):
        return contextlib.nullcontext()

    def record(self, stream=None):
        return None

    def wait(self, event, stream=None) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


class CudaEngine(SyncEngine):
    """Pinned host copies, async H2D copies, a side stream and CUDA events."""

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and t.is_pinned():
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t)
        return host

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=src.device.type != "cpu" or src.is_pinned())

    def side_stream(self):
        return torch.cuda.Stream(self.device)

    def using(self, stream):
        return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)

    def _stream(self, stream):
        return torch.cuda.current_stream(self.device) if stream is None else stream

    def record(self, stream=None):
        event = torch.cuda.Event()
        event.record(self._stream(stream))
        return event

    def wait(self, event, stream=None) -> None:
        self._stream(stream).wait_event(event)

    def wait_stream(self, stream) -> None:
        torch.cuda.current_stream(self.device).wait_stream(stream)


_override = None  # an engine installed by `use_engine` (the rehearsal's fake CUDA)


@contextlib.contextmanager
def use_engine(engine):
    """Route every `engine_for(cuda)` to `engine` while the block runs."""
    global _override
    prev, _override = _override, engine
    try:
        yield engine
    finally:
        _override = prev


def engine_for(device) -> SyncEngine:
    """The engine for copies to `device`: an installed override for CUDA, else the real one."""
    device = torch.device(device)
    if device.type == "cuda":
        return _override if _override is not None else CudaEngine(device)
    return SyncEngine(device)
