"""Strict dict -> dataclass conversion (the pydantic ``extra="forbid"`` behaviour without
pydantic), for recipes, calibration configs and manifests: unknown keys and wrong types fail with
the field's dotted path, so a typo is an error, never a silently ignored key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lance_deploy.core import units
from lance_deploy.core.errors import LanceUsageError


class SchemaError(LanceUsageError):
    """A document that cannot be used; the message names the file (if any), field and allowed values."""


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a hostile value cannot flood the one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fail(where: str, msg: str) -> SchemaError:
    """A SchemaError prefixed with the dotted field path."""
    return SchemaError(f"{where}: {msg}" if where else msg)


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
    """``value`` if it is one of ``types`` (bool never counts as int); else a SchemaError."""
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise fail(where, f"expected {what}, got {show(value)}")
    return value


def one_of(value: Any, allowed: tuple, where: str) -> Any:
    """``value`` if it is in ``allowed``; else a SchemaError listing them."""
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise fail(where, f"{show(value)} not allowed; allowed: {shown}")
    return value


def parse_size(text: str | int, where: str = "size") -> int:
    """`core.units.parse_size`, failing as a SchemaError at `where`."""
    try:
        return units.parse_size(text, where)
    except LanceUsageError as e:
        raise SchemaError(str(e)) from None


def expect_int(value: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` if it is an int (never a bool or a float) within [lo, hi]; else a SchemaError."""
    span = (f" >= {lo}" if hi is None else f" in [{lo}, {hi}]") if lo is not None else \
        ("" if hi is None else f" <= {hi}")
    expect(value, (int,), where, "an integer" + span)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise fail(where, f"expected an integer{span}, got {show(value)}")
    return value


def expect_number(value: Any, where: str, lo: float, hi: float) -> float:
    """``value`` as a float if it is a finite number with lo < value <= hi (bool never counts)."""
    expect(value, (int, float), where, f"a number in ({lo:g}, {hi:g}]")
    if not lo < value <= hi:
        raise fail(where, f"expected a number in ({lo:g}, {hi:g}], got {show(value)}")
    return float(value)


def expect_ints(value: Any, where: str, lo: int = 0, hi: int | None = None, length: int | None = None) -> tuple:
    """A list of ints (each within [lo, hi]) as a tuple; ``length`` fixes how many."""
    expect(value, (list, tuple), where, "a list of integers" if length is None else f"a list of {length} integers")
    if length is not None and len(value) != length:
        raise fail(where, f"expected a list of {length} integers, got {len(value)} items")
    return tuple(expect_int(v, f"{where}[{i}]", lo, hi) for i, v in enumerate(value))


def require(d: Mapping, names: tuple[str, ...] | list[str], where: str) -> None:
    """Refuse a mapping that lacks any of ``names``."""
    for n in names:
        if n not in d:
            raise fail(f"{where}.{n}" if where else n, "required field missing")
