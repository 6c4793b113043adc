"""Progress bars for long loops (tqdm on stderr; silent when disabled)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def step_bar(total: int, desc: str, enabled: bool = True):
    """Yield a `tick(i)` callback that advances a bar of `total` steps."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    try:
        yield lambda _i: bar.update(1)
    finally:
        bar.close()
