"""The ViT against the upstream golden fixtures (float32, CPU).

Covers patchify order, both ViT weight sets (standalone for Lance_3B, bundled `vit_model.*` for Lance_3B_Video),
partial windows, odd-T padding as delivered by the fixtures, and the ViT tokens recorded inside each task case.
"""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch
from golden_data import GOLDEN
from safetensors.torch import load_file

from lance_deploy.config import VisionConfig
from lance_deploy.model import vit as vit_mod
from lance_deploy.model.vit import QwenViT, patchify_video_with_merge, window_plan

STANDALONE = GOLDEN / "ckpt" / "Qwen2.5-VL-ViT"
VIDEO_CKPT = GOLDEN / "ckpt" / "Lance_3B_Video" / "model.safetensors"

pytestmark = pytest.mark.skipif(
    not (STANDALONE / "vit.safetensors").is_file() or not VIDEO_CKPT.is_file(),
    reason=f"golden fixtures not found under {GOLDEN} (set LANCE_GOLDEN)",
)

# Section 7 of the golden README.
REL_L2, MAX_ABS = 1e-4, 1e-3

# Which ViT each task case ran with (README section 8 item 10: the Video checkpoint's bundled ViT wins).
TASK_WEIGHTS = {"x2t_image": "standalone", "image_edit": "standalone", "x2t_video": "bundled", "video_edit": "bundled"}


def assert_close(actual: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    assert actual.shape == golden.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
    diff = (actual.double() - golden.double())
    rel = (diff.norm() / golden.double().norm()).item()
    mx = diff.abs().max().item()
    assert rel <= REL_L2 and mx <= MAX_ABS, f"{what}: rel-L2 {rel:.3e}, max-abs {mx:.3e}"


@lru_cache(maxsize=None)
def vit_config() -> VisionConfig:
    return VisionConfig.from_dict(json.loads((STANDALONE / "config.json").read_text()))


@lru_cache(maxsize=None)
def load_vit(which: str) -> QwenViT:
    """The golden ran in fp32: the BF16 standalone weights are upcast, the bundled ones are F32 already."""
    if which == "standalone":
        sd = load_file(str(STANDALONE / "vit.safetensors"))
    else:
        prefix = "vit_model."
        sd = {k[len(prefix):]: v for k, v in load_file(str(VIDEO_CKPT)).items() if k.startswith(prefix)}
    model = QwenViT(vit_config())
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads((GOLDEN / "cases" / f"{name}.json").read_text())
    return meta, load_file(str(GOLDEN / "cases" / f"{name}.safetensors"))


def run_vit(which: str, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return load_vit(which)(patches, grid)


# ------------------------------------------------------------------ dedicated ViT cases


@pytest.mark.parametrize("case", ["vit_image", "vit_video"])
def test_patchify_matches_upstream(case):
    _, t = load_case(case)
    patches, grid = patchify_video_with_merge(t["vit_pixels"], 14, 2)
    assert torch.equal(grid, t["grid_thw"])
    assert grid.dtype == torch.long
    # Pure data movement: must be bit exact.
    assert torch.equal(patches, t["vit_patches"])


@pytest.mark.parametrize("case", ["vit_image", "vit_video"])
@pytest.mark.parametrize("which,key", [("standalone", "vit_out_standalone"), ("bundled", "vit_out_video_bundled")])
def test_vit_case(case, which, key):
    _, t = load_case(case)
    out = run_vit(which, t["vit_patches"], t["grid_thw"])
    assert_close(out, t[key], f"{case}/{key}")


def test_bundled_vit_differs_from_standalone():
    """Guards against a loader silently using the wrong weights: the fixtures make the two ViTs differ."""
    _, t = load_case("vit_image")
    diff = (t["vit_out_standalone"] - t["vit_out_video_bundled"]).norm() / t["vit_out_standalone"].norm()
    assert diff > 0.1


# ------------------------------------------------------------------ ViT tokens inside the task cases


@pytest.mark.parametrize("case", sorted(TASK_WEIGHTS))
def test_task_vit_tokens(case):
    meta, t = load_case(case)
    patches, grid = patchify_video_with_merge(t["vit_pixels_0"], 14, 2)
    assert torch.equal(grid, t["vit_grid_thw"])
    out = run_vit(TASK_WEIGHTS[case], patches, grid)
    assert_close(out, t["vit_tokens"], f"{case}/vit_tokens")
    # One token per merge unit, consistent with the number of ViT slots in the prompt.
    gt, gh, gw = grid[0].tolist()
    assert out.shape[0] == gt * (gh // 2) * (gw // 2)
    assert meta["task"] == case


# ------------------------------------------------------------------ implementation invariants


def test_multi_grid_batch_equals_separate_calls():
    """Several grids in one call (how upstream batches vision blocks) must not interact."""
    _, a = load_case("vit_video")
    _, b = load_case("x2t_video")
    pb, gb = patchify_video_with_merge(b["vit_pixels_0"])
    out = run_vit("bundled", torch.cat([a["vit_patches"], pb]), torch.cat([a["grid_thw"], gb]))
    n = a["vit_out_video_bundled"].shape[0]
    assert_close(out[:n], a["vit_out_video_bundled"], "grid 0")
    assert_close(out[n:], b["vit_tokens"], "grid 1")


def test_sdpa_chunking_is_transparent(monkeypatch):
    """Splitting the per-segment SDPA batches (memory cap) must not change the result."""
    _, t = load_case("vit_video")
    ref = run_vit("standalone", t["vit_patches"], t["grid_thw"])
    monkeypatch.setattr(vit_mod, "_SCORE_BUDGET", 1)  # one segment per SDPA call
    out = run_vit("standalone", t["vit_patches"], t["grid_thw"])
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)


def test_window_plan_partial_windows():
    """grid 10x20 patches = 5x10 merge units -> 2x3 windows of up to 4x4 units, per temporal slice."""
    index, lens = window_plan(torch.tensor([[2, 10, 20]]), window_units=4, merge_size=2)
    assert sorted(index.tolist()) == list(range(100))
    per_slice = [16, 16, 8, 4, 4, 2]  # units per window, row-major over windows
    assert lens == [4 * u for u in per_slice * 2]
    # First window of slice 0: units of rows 0..3, columns 0..3 of the 5x10 unit lattice.
    assert index[:16].tolist() == [r * 10 + c for r in range(4) for c in range(4)]


def test_bf16_weights_compute_in_bf16():
    _, t = load_case("vit_image")
    model = QwenViT(vit_config())
    model.load_state_dict(load_vit("standalone").state_dict())
    model = model.to(torch.bfloat16)
    with torch.inference_mode():
        out = model(t["vit_patches"], t["grid_thw"])
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - t["vit_out_standalone"]).norm() / t["vit_out_standalone"].norm()).item()
    assert rel < 5e-2  # bf16 is not golden-exact (README section 7), but must be the same computation


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        patchify_video_with_merge(torch.zeros(3, 3, 28, 28))  # odd T: caller must repeat the last frame
    with pytest.raises(ValueError):
        patchify_video_with_merge(torch.zeros(3, 2, 28, 42))  # W not a multiple of 28
    model = load_vit("standalone")
    with pytest.raises(ValueError):
        model(torch.zeros(10, 1176), torch.tensor([[1, 2, 2]]))
