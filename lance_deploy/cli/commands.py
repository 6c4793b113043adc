"""The list of registered commands; each lives in its own module."""

from __future__ import annotations

ALL: list = []
