"""Bounded JSON parsing for every document read from disk (headers, configs, manifests).

``json.loads`` alone turns hostile input into tracebacks: a 100k-deep ``[[[...`` raises
RecursionError, a 5000-digit int ValueError, a repeated key silently keeps the last value, and
``NaN`` slips in as a float. ``loads`` checks size and nesting depth BEFORE parsing (C-speed byte
passes, no Python loop over the text) and fails each case as one line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lance_deploy.core.schema import SchemaError

MAX_DEPTH = 32
"""Deeper than any document lance-deploy writes (manifests nest 5 levels)."""

_OTHER_BYTES = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STRING = re.compile(rb'"[^"]*"')
EXACT_BYTES = 16 * 1024 * 1024
"""Up to this size, brackets inside strings (JSON kept in safetensors metadata) are not counted."""


def _bracket_bound(raw: bytes, limit: int) -> int:
    """An upper bound on the bracket nesting of ``raw`` (or a proof that it exceeds ``limit``),
    with C-speed byte passes only: brackets inside strings count too."""
    brackets = raw.translate(None, delete=_OTHER_BYTES)
    too_deep = re.compile(rb"[\[{]{%d}" % (limit + 1))  # that many opens in a row nest that deep
    passes = 0
    while brackets and passes <= limit:
        if too_deep.search(brackets):
            return limit + 1
        shorter = brackets.replace(b"[]", b"")
        passes += len(shorter) != len(brackets)
        inner = shorter.replace(b"{}", b"")
        passes += len(inner) != len(shorter)
        if len(inner) == len(brackets):
            break  # unbalanced: what is left nests at most len() deeper
        brackets = inner
    return passes + len(brackets)


def _depth_bound(raw: bytes, limit: int) -> int:
    bound = _bracket_bound(raw, limit)
    if bound <= limit or len(raw) > EXACT_BYTES:
        return bound
    # again with every string emptied: escaped backslashes, then escaped quotes, can go first
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    return _bracket_bound(_STRING.sub(b'""', plain), limit)


def _no_duplicates(where: str, error: type[Exception]):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise error(f"{where}: duplicate key {k!r} in one JSON object")
            out[k] = v
        return out

    return hook


def _refuse_constant(where: str, error: type[Exception]):
    def hook(name: str):
        raise error(f"{where}: {name} is not a JSON number")

    return hook


def loads(raw: bytes | str, where: str, *, max_bytes: int, max_depth: int = MAX_DEPTH,
          error: type[Exception] = SchemaError) -> Any:
    """Parse ``raw`` (named ``where`` in every message) or raise ``error`` in one line."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise error(f"{where}: {len(data):,} bytes of JSON, more than the {max_bytes:,} allowed")
    if _depth_bound(data, max_depth) > max_depth:
        raise error(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates(where, error),
                          parse_constant=_refuse_constant(where, error))
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # ints past sys.get_int_max_str_digits()
        raise error(f"{where}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
