"""A killed export leaves `.<out>.partial-<pid>-*`; the next export into the same place removes it
(never the partial folder of an export that is still running)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from golden_data import GOLDEN

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lance_deploy.cli.export_cmd import export_group

CKPT = GOLDEN / "ckpt"
pytestmark = pytest.mark.skipif(not (CKPT / "Lance_3B").is_dir(), reason=f"golden checkpoint not found under {CKPT}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_of_a_killed_export_is_removed(tmp_path):
    out = tmp_path / "und"
    dead = tmp_path / f".und.partial-{_dead_pid()}-k1ll3d"
    (dead / "graphs").mkdir(parents=True)
    (dead / "graphs" / "half.onnx").write_bytes(b"\0" * 64)
    live = tmp_path / f".und.partial-{os.getpid()}-running"  # this process is alive: not stale
    live.mkdir()
    other = tmp_path / ".other.partial-1-x"  # another export's name
    other.mkdir()
    res = CliRunner().invoke(export_group, ["onnx", "--model", str(CKPT), "--preset", "image_256res", "--out",
                                            str(out), "--part", "und-layer", "--layers", "0"])
    assert res.exit_code == 0, res.output
    assert not dead.exists()
    assert live.is_dir() and other.is_dir()
    assert (out / "graphs").is_dir()
    assert f"removed {dead.name}" in res.output
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted([".other.partial-1-x", live.name, "und"])
