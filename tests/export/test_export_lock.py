"""One `export onnx` per --out: a second is refused with one line naming the first one's pid."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from golden_data import GOLDEN

pytest.importorskip("onnx")

from lance_deploy.cli.export_cmd import export_group

CKPT = GOLDEN / "ckpt"
pytestmark = pytest.mark.skipif(not (CKPT / "Lance_3B").is_dir(), reason=f"golden checkpoint not found under {CKPT}")

HOLD = """
    import sys
    from lance_deploy.core.lock import PathLock
    lock = PathLock(sys.argv[1]).acquire()
    print("held", flush=True)
    sys.stdin.readline()  # until the test lets go
"""


def test_second_export_into_one_out_is_refused(tmp_path):
    out = tmp_path / "und"
    args = ["onnx", "--model", str(CKPT), "--preset", "image_256res", "--out", str(out), "--part", "und-layer",
            "--layers", "0"]
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(out.resolve())],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = CliRunner().invoke(export_group, args)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert lines[0].startswith(f"Error: --out {out.resolve()}: another lance-deploy process is writing it "
                                   f"(pid {holder.pid} on ")
        assert not out.exists()
    finally:
        holder.communicate("go\n", timeout=60)
    res = CliRunner().invoke(export_group, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["und"]  # the lock file is gone too
