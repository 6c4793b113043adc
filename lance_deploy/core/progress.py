"""Progress for long work, the one mechanism every command uses: tqdm bars on stderr, JSON-line
events on stderr (`--json`), or nothing (`--quiet`).

A command picks the style once with `use(mode)`; code at any floor then reports through `bar()`.
Bars opened with `enabled=None` (loading, VAE tiles) only draw while a command has called
`use()`, so library callers and tests see nothing they did not ask for.

An event is one JSON object per line:
``{"event": "progress", "phase": "t2i denoise", "done": 3, "total": 30, "unit": "step",
"elapsed_s": 1.2, "eta_s": 10.8}``; one is written at the start (after `delay`), at most every `EVENT_EVERY_S`
after, and one at the end, so a slow consumer never floods.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

MODES = ("bar", "json", "off")
EVENT_EVERY_S = 0.5
_mode: list[str | None] = [None]  # None: no command chose a style (ambient bars stay silent)
_tracking: list = []  # bars opened with track=True, innermost last: what `advance()` moves


@contextmanager
def use(mode: str):
    """Report in `mode` ('bar', 'json' or 'off') inside the block."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
    previous = _mode[0]
    _mode[0] = mode
    try:
        yield
    finally:
        _mode[0] = previous


def mode_for(quiet: bool, as_json: bool) -> str:
    """The style a command's `--quiet` / `--json` flags ask for."""
    return "off" if quiet else "json" if as_json else "bar"


def emit(event: str, **fields) -> None:
    """One JSON event line on stderr, in json mode only."""
    if _mode[0] == "json":
        sys.stderr.write(json.dumps({"event": event, **fields}, default=str) + "\n")
        sys.stderr.flush()


class _Events:
    """The json-mode stand-in for a tqdm bar (update / close / total)."""

    def __init__(self, total: int | None, desc: str, unit: str, delay: float):
        self.total, self.desc, self.unit, self.delay = total, desc, unit, delay
        self.n, self.sent, self.start, self.last = 0, -1, time.perf_counter(), None
        if delay <= 0:
            self._send()

    def _send(self) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.n * (self.total - self.n) if self.n and self.total else None
        emit("progress", phase=self.desc, done=self.n, total=self.total, unit=self.unit, elapsed_s=round(elapsed, 3),
             eta_s=None if eta is None else round(eta, 3))
        self.last, self.sent = time.perf_counter(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.start < self.delay:
            return
        if self.last is None or now - self.last >= EVENT_EVERY_S or (self.total and self.n >= self.total):
            self._send()

    def close(self) -> None:
        shown = self.last is not None or time.perf_counter() - self.start >= self.delay
        if shown and self.sent != self.n:  # the final count always goes out
            self._send()


def advance(n: int = 1) -> None:
    """Move the innermost bar opened with `track=True` (a no-op when there is none): lets a deep
    loop (one tensor loaded) report without a callback threaded through every call."""
    if _tracking:
        _tracking[-1].update(n)


@contextmanager
def _tracked(b, track: bool):
    if track and b is not None:
        _tracking.append(b)
    try:
        yield b
    finally:
        if track and b is not None:
            _tracking.remove(b)


@contextmanager
def bar(total: int | None, desc: str, *, unit: str = "step", enabled: bool | None = True, delay: float = 0.0,
        track: bool = False):
    """Yield an object with `update(n=1)` (a tqdm bar, its json-mode twin), or None when silent.

    `enabled=False` is always silent; `True` draws unless the command said `--quiet`; `None` draws
    only under `use('bar'|'json')`. `delay`: nothing shows before that many seconds, so short
    phases stay quiet. `track`: `advance()` moves this bar while it is open."""
    mode = _mode[0]
    if enabled is False or mode == "off" or (enabled is None and mode is None):
        yield None
        return
    if mode == "json":
        ev = _Events(total, desc, unit, delay)
        try:
            with _tracked(ev, track):
                yield ev
        finally:
            ev.close()
        return
    from tqdm import tqdm

    b = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, delay=delay, file=sys.stderr)
    try:
        with _tracked(b, track):
            yield b
    finally:
        b.close()


LOAD_DELAY_S = 1.0


def loading(desc: str = "load"):
    """The bar of a model load: tensors read so far (`checkpoint.loader` advances it), shown only
    under a command's progress mode and when the load takes longer than `LOAD_DELAY_S`."""
    return bar(None, desc, unit="tensor", enabled=None, delay=LOAD_DELAY_S, track=True)


def shown(enabled: bool | None = True) -> bool:
    """Whether a bar opened with `enabled` would report anything (lets a caller skip work done only to report)."""
    mode = _mode[0]
    return not (enabled is False or mode == "off" or (enabled is None and mode is None))


def note(text: str, *, event: str = "note", enabled: bool | None = True, **fields) -> None:
    """One line beside the bars on stderr, or in json mode an `event` carrying `text` and `fields`;
    nothing when silent (same `enabled` rule as `bar`)."""
    if not shown(enabled):
        return
    if _mode[0] == "json":
        emit(event, text=text, **fields)
        return
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)
