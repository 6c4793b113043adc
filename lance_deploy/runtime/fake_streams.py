"""A `CopyEngine` for fake CUDA: streams and events as vector clocks, with a race check.

Every device op the rehearsal sees is charged to the engine's current stream as reads and
writes of storages (`access`). An access races when another stream touched the same storage
(a write, or a read before our write) and no event or stream wait orders that access before
this one: exactly what a missing `wait_event` in the pager would be on a GPU, where it shows
only as wrong numbers some of the time. The check runs at release shapes on any machine.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch

from lance_deploy.core.errors import LanceError
from lance_deploy.runtime.copy_engine import SyncEngine


class StreamRace(LanceError):
    """Two streams touched one device buffer with nothing ordering them."""


@dataclass(eq=False)
class FakeStream:
    name: str


@dataclass(eq=False)
class FakeEvent:
    stream: FakeStream
    clock: dict = field(default_factory=dict)  # stream -> ops of that stream this event covers


@dataclass
class _Access:
    write: tuple | None = None  # (stream, position)
    reads: dict = field(default_factory=dict)  # stream -> last read position


class FakeCudaEngine(SyncEngine):
    """The CUDA engine's calls on fake tensors, ordering checked instead of executed."""

    def __init__(self, device="cuda"):
        super().__init__(device)
        self.compute = FakeStream("compute")
        self.current = self.compute
        self.clocks = {self.compute: {self.compute: 0}}
        self.state: dict[int, _Access] = {}  # storage key -> last accesses
        self.names: dict[int, str] = {}  # storage key -> a label for messages (the slot buffers)
        self.calls = Counter()

    # -- the CopyEngine interface -------------------------------------------------------------
    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        self.calls["host_copy"] += 1
        return t if t.device.type == "cpu" else t.to("cpu")

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.calls["copy"] += 1
        dst.copy_(src)

    def side_stream(self) -> FakeStream:
        s = FakeStream(f"side{len(self.clocks)}")
        self.clocks[s] = {s: 0}
        return s

    @contextlib.contextmanager
    def using(self, stream):
        prev = self.current
        self.current = stream or prev
        try:
            yield
        finally:
            self.current = prev

    def record(self, stream=None) -> FakeEvent:
        s = stream or self.current
        self.calls["record"] += 1
        return FakeEvent(s, dict(self.clocks[s]))

    def wait(self, event: FakeEvent, stream=None) -> None:
        self.calls["wait"] += 1
        _merge(self.clocks[stream or self.current], event.clock)

    def wait_stream(self, stream) -> None:
        self.calls["wait_stream"] += 1
        _merge(self.clocks[self.current], self.clocks[stream])

    # -- the race check ---------------------------------------------------------------------------
    def access(self, reads, writes) -> None:
        """One op on the current stream reading / writing storages (keys)."""
        s = self.current
        clock = self.clocks[s]
        clock[s] += 1
        pos = clock[s]
        for key in reads:
            st = self.state.setdefault(key, _Access())
            if st.write and st.write[0] is not s and clock.get(st.write[0], 0) < st.write[1]:
                self._race(key, "reads", st.write[0], "wrote")
            st.reads[s] = pos
        for key in writes:
            st = self.state.setdefault(key, _Access())
            if st.write and st.write[0] is not s and clock.get(st.write[0], 0) < st.write[1]:
                self._race(key, "writes", st.write[0], "wrote")
            for other, p in st.reads.items():
                if other is not s and clock.get(other, 0) < p:
                    self._race(key, "writes", other, "read")
            st.write, st.reads = (s, pos), {}

    def forget(self, key: int) -> None:
        """A storage was freed (its key may be reused by a new one)."""
        self.state.pop(key, None)
        self.names.pop(key, None)

    def _race(self, key, verb, other, did) -> None:
        what = self.names.get(key, f"a device buffer ({key:#x})")
        raise StreamRace(f"stream race: {self.current.name} {verb} {what} that {other.name} {did} "
                         "with no event or stream wait ordering the two")


def _merge(into: dict, other: dict) -> None:
    for s, p in other.items():
        if into.get(s, 0) < p:
            into[s] = p
