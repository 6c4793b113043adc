"""`bash benchmarks/device_suite.sh --dry-run`: the GPU suite's own script on the CPU with the tiny model.

Every step must pass (a missing or broken benchmark fails here before it costs device time), and
the report must hold the planner's per-phase numbers beside the runs and the rehearsal's rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_passes_and_reports(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_suite.sh"), "--dry-run", "--out", str(out)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=2400,
                          env={**os.environ, "PYTHON": sys.executable})
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    failed = [s for s in steps if s["rc"] != 0]
    assert proc.returncode == 0 and not failed, f"failed steps {failed}\n{proc.stdout[-3000:]}"
    data = json.loads((out / "device_suite.json").read_text())
    runs = {(r["task"], r["budget"]): r for r in data["memory"] if "error" not in r}
    assert {("t2i", "resident"), ("t2i", "70MiB"), ("x2t_image", "resident")} <= set(runs)
    assert runs[("t2i", "70MiB")]["paged"] and set(runs[("t2i", "70MiB")]["phases"]) == {"prefill", "denoise",
                                                                                         "vae_decode"}
    assert any(r.get("label") == "int8-rtn" for r in data["memory"])
    assert {r["phase"] for r in data["rehearsal"] if r["task"] == "t2i" and "phase" in r} == {
        "prefill", "denoise", "vae_decode"}
    assert set(data["quantize"]) == {"fp8-rtn", "int8-rtn"}
    md = (out / "device_suite.md").read_text()
    assert "| t2i:64x64 | bf16 | 70MiB | denoise |" in md
