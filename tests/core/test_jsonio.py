"""Bounded JSON: every hostile document is one SchemaError line, decided before `json.loads` where
the parser itself would fail badly (deep nesting)."""

from __future__ import annotations

import json

import pytest

from lance_deploy.core.jsonio import loads
from lance_deploy.core.schema import SchemaError


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, "f.json: JSON nested deeper than 32 levels"),
    (b"[" * 100_000, "f.json: JSON nested deeper than 32 levels"),
    (b"[[]" * 50, "f.json: JSON nested deeper than 32 levels"),
    (b'{"a": 1, "a": 2}', "f.json: duplicate key 'a' in one JSON object"),
    (b"[NaN]", "f.json: NaN is not a JSON number"),
    (b"[" + b"9" * 5000 + b"]", "f.json: not valid JSON (Exceeds the limit (4300 digits)"),
    (b'{"a": ', "f.json: not valid JSON (Expecting value"),
    (b"\xff{}", "f.json: not UTF-8 text (invalid start byte at byte 0)"),
    (b" " * 2000, "f.json: 2,000 bytes of JSON, more than the 1,000 allowed"),
])
def test_hostile_json_is_one_line(raw, message):
    with pytest.raises(SchemaError) as e:
        loads(raw, "f.json", max_bytes=1000 if len(raw) == 2000 else 10**7)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_brackets_inside_strings_do_not_count():
    doc = {"meta": {"cfg": json.dumps([[[[[[[[1]]]]]]]] * 3), "note": "[[[[[[[[[[[[unbalanced"}}
    assert loads(json.dumps(doc), "f", max_bytes=10**6, max_depth=3) == doc
    assert loads(b'["a\\\\", "]]]]\\"[[[["]', "f", max_bytes=100, max_depth=1) == ["a\\", ']]]]"[[[[']
