"""The golden reference set and its tolerance checks (a plain module: a conftest of a subfolder would shadow it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(os.environ.get("LANCE_GOLDEN", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))


def golden_root() -> Path:
    if not (GOLDEN / "cases").is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN} (set LANCE_GOLDEN)")
    return GOLDEN


def load_case(name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    root = golden_root()
    meta = json.loads((root / "cases" / f"{name}.json").read_text())
    return meta, load_file(str(root / "cases" / f"{name}.safetensors"))


def assert_close(actual: torch.Tensor, golden: torch.Tensor, what: str, rel: float = 1e-4, abs_: float = 1e-3):
    """The golden README's float32 criterion: rel-L2 <= 1e-4 and max-abs <= 1e-3."""
    a, g = actual.detach().float().cpu(), golden.float()
    assert a.shape == g.shape, f"{what}: shape {tuple(a.shape)} != {tuple(g.shape)}"
    err = (a - g).norm() / g.norm().clamp_min(1e-12)
    mx = (a - g).abs().max()
    assert err <= rel and mx <= abs_, f"{what}: rel-L2 {err:.3e}, max-abs {mx:.3e}"


def assert_uint8_close(actual, golden, what: str):
    """|a - g| <= 1 everywhere and at most 0.1 % of values differ."""
    a, g = torch.as_tensor(actual).int(), torch.as_tensor(golden).int()
    assert a.shape == g.shape, f"{what}: shape {tuple(a.shape)} != {tuple(g.shape)}"
    diff = (a - g).abs()
    assert int(diff.max()) <= 1, f"{what}: max diff {int(diff.max())}"
    assert float((diff > 0).float().mean()) <= 1e-3, f"{what}: {(diff > 0).float().mean():.3%} differ"
