"""Progress bars for long loops: `core.progress` (tqdm on stderr, JSON events under `--json`,
silent when disabled), with the per-step callback the denoise and decode loops take."""

from __future__ import annotations

from contextlib import contextmanager

from lance_deploy.core.progress import bar


@contextmanager
def step_bar(total: int, desc: str, enabled: bool | None = True, unit: str = "step"):
    """Yield a `tick(i)` callback that advances a bar of `total` steps (None when silent)."""
    with bar(total, desc, unit=unit, enabled=enabled) as b:
        yield None if b is None else (lambda _i: b.update(1))
