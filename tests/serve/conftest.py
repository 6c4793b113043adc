"""Fixtures for the server tests: the tiny checkpoint, one resident engine shared by every server,
and the main live server. Every request a test sends goes to 127.0.0.1 only."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")

from serve_util import GOLDEN, live_server  # noqa: E402


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """The golden tiny download folder when present, else a fresh `make-checkpoint --tiny`."""
    golden = GOLDEN / "ckpt"
    if (golden / "Lance_3B_Video").is_dir() and (golden / "Lance_3B").is_dir():
        return golden
    from lance_deploy.checkpoint.make import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def engine(ckpt):
    from lance_deploy.serve.engine import Engine

    return Engine.load(ckpt, device="cpu")


@pytest.fixture(scope="session")
def server(engine, ckpt, tmp_path_factory):
    """The main server: queue of 16, no API key, no UI (the browser test starts its own)."""
    with live_server(engine, ckpt, tmp_path_factory.mktemp("serve-out"), queue_size=16) as live:
        yield live


@pytest.fixture
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
