"""Builders for damaged inputs: copies of the golden folders with one file replaced, safetensors
headers rewritten in place, a sealed artifact, and the one-line check every CLI error must pass."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli


def ckpt() -> Path:
    return golden_root() / "ckpt"


def model_copy(dst: Path, variant_dir: str = "Lance_3B", replace: tuple[str, ...] = ()) -> Path:
    """``dst`` holding the golden model folder's files as symlinks (release folders may use them),
    except the names in ``replace``, which are real copies to damage."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in (ckpt() / variant_dir).iterdir():
        if f.name in replace:
            shutil.copyfile(f, dst / f.name)
            os.chmod(dst / f.name, 0o644)
        else:
            os.symlink(f, dst / f.name)
    return dst


def download_copy(dst: Path, replace_vit_config: bool = True) -> Path:
    """A download folder: Lance_3B (symlinks), the ViT folder with a writable config.json, the VAE."""
    model_copy(dst / "Lance_3B")
    vit = dst / "Qwen2.5-VL-ViT"
    vit.mkdir(parents=True)
    os.symlink(ckpt() / "Qwen2.5-VL-ViT" / "vit.safetensors", vit / "vit.safetensors")
    if replace_vit_config:
        shutil.copyfile(ckpt() / "Qwen2.5-VL-ViT" / "config.json", vit / "config.json")
    os.symlink(ckpt() / "Wan2.2_VAE.pth", dst / "Wan2.2_VAE.pth")
    return dst


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    """Header text padded with spaces to 8 bytes (as writers do), its length field, then ``data``."""
    padded = header_text + b" " * (-len(header_text) % 8)
    n = len(padded) if length is None else length
    return n.to_bytes(8, "little") + padded + data


def rewrite_header(path: Path, edit) -> Path:
    """Apply ``edit(header)`` to the header of the safetensors file at ``path``, data unchanged."""
    header, data = split_safetensors(path)
    edit(header)
    path.write_bytes(join_safetensors(json.dumps(header).encode(), data))
    return path


def quantized_artifact(out: Path, recipe: str = "int8-rtn") -> Path:
    """The golden image model quantized (RTN, no calibration): a real sealed artifact."""
    from lance_deploy.quant.quantize import quantize
    from lance_deploy.quant.recipe import load_recipe

    quantize(ckpt() / "Lance_3B", load_recipe(recipe), out, work_dir=out.with_name(out.name + ".job"),
             progress=False)
    return out


def run_cli(args: list[str]) -> tuple[int, str, BaseException | None]:
    """(exit code, stderr, the exception if it was not a clean exit) of one in-process CLI call."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    exc = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
    return res.exit_code, res.stderr, exc


def one_line_error(err: str) -> str | None:
    """The error line if ``err`` is exactly one 'Error: ...' line and no traceback, else None."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if "Traceback" in err or len(lines) != 1 or not lines[0].startswith("Error: "):
        return None
    return lines[0]


def assert_cli_error(args: list[str], *needles: str, code: int = 2) -> str:
    """Run the CLI and assert a one-line error with ``code`` that contains every needle."""
    got, err, exc = run_cli(args)
    assert exc is None, repr(exc)
    line = one_line_error(err)
    assert got == code and line is not None, (got, err)
    for n in needles:
        assert n in line, (n, line)
    return line
