"""The package's shape: floors that only import downwards (import-linter), and lean imports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: pip install -e '.[dev]'")
    # the checked tree comes first on sys.path, so a copy is checked instead of the installed package
    return subprocess.run([exe, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_import_contract_holds():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_a_back_up_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "lance_deploy", tmp_path / "lance_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "lance_deploy" / "pipeline" / "tasks.py", "a") as f:
        f.write("\nfrom lance_deploy.cli import common  # noqa\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0 and "floors follow the data BROKEN" in r.stdout, r.stdout[-3000:]
    assert "lance_deploy.pipeline.tasks -> lance_deploy.cli.common" in r.stdout


def test_imports_stay_lean():
    """`import lance_deploy` loads no torch; the CLI and the runtime side load no optional package,
    no calibration or algorithm code, and do not initialise CUDA."""
    code = ("import sys, json; import lance_deploy; lean = 'torch' not in sys.modules; "
            "import lance_deploy.cli, lance_deploy.cli.export_cmd, lance_deploy.pipeline.pipeline, "
            "lance_deploy.artifact.load, lance_deploy.formats.qlinear, lance_deploy.planning.request, torch; "
            "print(json.dumps([lean, torch.cuda.is_initialized(), sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lean, cuda, mods = json.loads(out.stdout.strip().splitlines()[-1])
    assert lean and not cuda
    banned = [m for m in mods if m.split(".")[0] in ("onnx", "onnxruntime", "tensorrt", "bitsandbytes")
              or m.startswith(("lance_deploy.calibrate", "lance_deploy.quant", "lance_deploy.export."))]
    assert not banned, banned


def test_demo_runs_without_optional_packages(tmp_path):
    """The Quickstart installs no extras: the demo must not need onnx, onnxruntime or bitsandbytes."""
    stubs = tmp_path / "stubs"
    for name in ("onnx", "onnxruntime", "onnxscript", "bitsandbytes", "tensorrt"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed (test stub)')\n")
    cmd = [sys.executable, "-m", "lance_deploy", "demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(stubs), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "demo" / "t2i.png").is_file()


def test_missing_extra_names_its_install_command(monkeypatch):
    from lance_deploy.core import optional
    from lance_deploy.core.errors import LanceError

    real = optional.importlib.import_module

    def without_onnx(name, *args):
        if name == "onnx":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(optional.importlib, "import_module", without_onnx)
    with pytest.raises(LanceError, match=r"ONNX export needs onnx, which is not installed: pip install 'lance-deploy\[onnx\]'"):
        optional.require("onnx")
    assert "pip install 'lance-deploy[bnb]'" in optional.install_hint("bitsandbytes")
