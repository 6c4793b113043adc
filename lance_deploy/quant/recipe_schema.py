"""Strict dict -> dataclass conversion for recipes (the pydantic ``extra="forbid"`` behaviour
without pydantic): unknown keys and wrong types fail with the field's dotted path, so a typo in a
YAML recipe is an error, never a silently ignored key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from lance_deploy.errors import LanceUsageError


class RecipeError(LanceUsageError):
    """A recipe that cannot be used; the message names the file (if any), field and allowed values."""


def fail(where: str, msg: str) -> RecipeError:
    """A RecipeError prefixed with the dotted field path."""
    return RecipeError(f"{where}: {msg}" if where else msg)


def check_keys(cls, d: Any, where: str) -> dict:
    """``d`` as a dict, after refusing non-mappings and keys that are not fields of ``cls``."""
    if not isinstance(d, Mapping):
        raise fail(where, f"expected a mapping with fields {field_names(cls)}, got {type(d).__name__}")
    allowed = field_names(cls)
    for k in d:
        if k not in allowed:
            raise fail(f"{where}.{k}" if where else str(k), f"unknown field; allowed: {', '.join(allowed)}")
    return dict(d)


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def expect(value: Any, types: tuple[type, ...], where: str, what: str) -> Any:
    """``value`` if it is one of ``types`` (bool never counts as int); else a RecipeError."""
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise fail(where, f"expected {what}, got {value!r}")
    return value


def one_of(value: Any, allowed: tuple, where: str) -> Any:
    """``value`` if it is in ``allowed``; else a RecipeError listing them."""
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise fail(where, f"{value!r} not allowed; allowed: {shown}")
    return value


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int, where: str = "size") -> int:
    """Bytes of '12GiB' (binary), '12GB' (decimal), '512MiB' or a plain integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise fail(where, f"{text!r} is not a size; write e.g. 12GiB, 16GB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
