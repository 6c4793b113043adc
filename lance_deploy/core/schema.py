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
        raise fail(where, f"expected {what}, got {value!r}")
    return value


def one_of(value: Any, allowed: tuple, where: str) -> Any:
    """``value`` if it is in ``allowed``; else a SchemaError listing them."""
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise fail(where, f"{value!r} not allowed; allowed: {shown}")
    return value


def parse_size(text: str | int, where: str = "size") -> int:
    """`core.units.parse_size`, failing as a SchemaError at `where`."""
    try:
        return units.parse_size(text, where)
    except LanceUsageError as e:
        raise SchemaError(str(e)) from None
