"""Overlap disk and CPU work: read the next items on one thread, write finished ones on another.

A full-size quantize reads ~27 GB (disk-bound), packs it (CPU-bound) and writes the ~9 GB
artifact. Run one after the other those add up; with
`read_ahead` and `WriteBehind` around the CPU loop they overlap, so the run approaches the
time of one read (`benchmarks/quantize_full.py`). Both are bounded, so memory stays at a few
items: `read_ahead` holds at most `max_bytes` of loaded items (one larger item is loaded alone),
`WriteBehind` at most `depth` jobs not yet finished.

Order is kept in both, and a failure surfaces in the caller: a loader's exception is raised
when its item is taken, a write job's at the next `submit` or at `close`. Leaving early (an
exception in the caller) stops the reader and waits for the write in progress, so nothing
touches the caller's files after it has returned.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Self, TypeVar

T = TypeVar("T")


def read_ahead(loaders: Iterable[tuple[int, Callable[[], T]]], max_bytes: int) -> Iterator[T]:
    """Yield `load()` of each (nbytes, load) in order; the next ones run on a background thread
    while the caller holds the current one. An item counts as held until the next is asked for."""
    items = list(loaders)
    done: dict[int, tuple[bool, object]] = {}
    held, stop, cond = [0], threading.Event(), threading.Condition()

    def work() -> None:
        for i, (nbytes, load) in enumerate(items):
            with cond:
                while not stop.is_set() and held[0] > 0 and held[0] + nbytes > max_bytes:
                    cond.wait()
                if stop.is_set():
                    return
                held[0] += nbytes
            try:
                result: tuple[bool, object] = (True, load())
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller at this item's turn
                result = (False, e)
            ok = result[0]
            with cond:
                done[i] = result
                cond.notify_all()
            # drop this frame's reference: it would keep the item alive through the next load
            del result
            if not ok:
                return

    thread = threading.Thread(target=work, name="lance-read-ahead", daemon=True)
    thread.start()
    try:
        for i, (nbytes, _) in enumerate(items):
            with cond:
                while i not in done:
                    cond.wait()
                ok, value = done.pop(i)
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
            del value
            with cond:
                held[0] -= nbytes
                cond.notify_all()
    finally:
        stop.set()
        with cond:
            cond.notify_all()
        thread.join()


class WriteBehind:
    """Run jobs in submission order on one background thread, at most `depth` unfinished.

    Use as a context manager: a clean exit waits for every job (raising the first failure);
    an exit by exception waits for the jobs already submitted, then lets the exception go on.
    """

    def __init__(self, depth: int = 1):
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lance-write-behind")
        self._pending: deque[Future] = deque()

    def submit(self, job: Callable[[], object]) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(job))

    def close(self) -> None:
        """Wait for every job; raises the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        for f in self._pending:
            if not f.cancelled():
                f.exception()  # wait; the caller's exception is the one that propagates
        self._pending.clear()
        self._pool.shutdown(wait=True)
