"""Atomic writes honour the umask (mkstemp alone makes 0600), and caches live in the user cache folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lance_deploy.core.cachedir import user_cache_dir
from lance_deploy.core.fsutil import atomic_path, publish_bytes


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    with atomic_path(tmp_path / "manifest.json") as tmp:
        tmp.write_text("{}")
    publish_bytes(tmp_path / "out.bin", b"data")
    assert _mode(tmp_path / "manifest.json") == expected
    assert _mode(tmp_path / "out.bin") == expected
    assert (tmp_path / "manifest.json").read_text() == "{}"


def test_user_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir("onnx") == tmp_path / "lance-deploy" / "onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the spec says: ignore it
    assert user_cache_dir() == Path.home() / ".cache" / "lance-deploy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir("x") == Path.home() / ".cache" / "lance-deploy" / "x"


def test_onnx_cache_is_never_beside_the_checkpoint(monkeypatch, tmp_path):
    from lance_deploy.export.backend import CACHE_ENV, cache_root

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lance-deploy" / "onnx"
    assert cache_root().is_dir()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_publish_without_overwrite_never_replaces(tmp_path):
    target = tmp_path / "out.bin"
    publish_bytes(target, b"new", overwrite=False)
    assert target.read_bytes() == b"new"
    with pytest.raises(FileExistsError):
        publish_bytes(target, b"other", overwrite=False)
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
