"""Byte sizes: one parser for every size option and one formatter for every printed size."""

from __future__ import annotations

import math
import re

from lance_deploy.core.errors import LanceUsageError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40}  # fmt: skip


def parse_size(text, option: str = "--gpu-memory") -> int:
    """'16GiB' (binary), '12GB' (decimal), '8000MiB', '7.5GiB' or a byte count -> bytes (> 0).

    Errors are one line naming `option`."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise LanceUsageError(f"{option} {text!r}: expected a size like 16GiB, 12GB, 8000MiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise LanceUsageError(f"{option} {text!r}: must be positive")
    return value


def format_bytes(n: int, *, si: bool = False, digits: int = 2, round_up: bool = False) -> str:
    """'1.50 GiB' (binary units) or, with `si`, '24.74 GB' (decimal, as release sizes are quoted).

    `round_up` rounds the last digit up, for minimum budgets that must not be understated."""
    scales = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if si else (("GiB", GiB), ("MiB", MiB), ("KiB", KiB))
    for unit, scale in scales:
        if abs(n) >= scale:
            v = n / scale
            if round_up:
                v = math.ceil(v * 10**digits) / 10**digits
            return f"{v:.{digits}f} {unit}"
    return f"{n} B"
