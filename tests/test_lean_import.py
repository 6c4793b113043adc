"""`import lance_deploy` stays lean, and the runtime never imports calibration or algorithm code."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_package_import_is_lean():
    mods = _modules_after("import lance_deploy")
    assert not {"torch", "onnx", "onnxruntime", "tensorrt", "bitsandbytes"} & mods


def test_runtime_does_not_import_calibration_or_algorithms():
    mods = _modules_after("import lance_deploy.pipeline.pipeline, lance_deploy.artifact.load, "
                          "lance_deploy.cli")
    banned = [m for m in mods if m.startswith(("lance_deploy.calibrate", "lance_deploy.quant.algorithms",
                                               "lance_deploy.quant.quantize", "lance_deploy.quant.apply"))]
    assert not banned, banned
    assert "tensorrt" not in mods and "onnxruntime" not in mods


def test_cli_import_does_not_initialise_cuda():
    out = subprocess.run([sys.executable, "-c", "import lance_deploy.cli, torch; print(torch.cuda.is_initialized())"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
