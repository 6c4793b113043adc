"""Tiled VAE decode/encode: layout, blend weights, config checks, parity with the untiled VAE on the
tiny golden checkpoint, the auto switch in `WanVAE.encode/decode`, and the memory it saves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from golden_data import GOLDEN
from torch import nn

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.model import vae as vae_module
from lance_deploy.model.vae import WanVAE, load_vae
from lance_deploy.model.vae_blocks import CausalConv3d
from lance_deploy.model.vae_tiling import (
    TilingConfig,
    TilingError,
    axis_weights,
    plan_tiles,
    tile_spans,
    tiled_decode,
    tiled_encode,
)

CKPT = GOLDEN / "ckpt" / "Wan2.2_VAE.pth"
needs_ckpt = pytest.mark.skipif(not CKPT.is_file(), reason=f"golden VAE not found at {CKPT} (set LANCE_GOLDEN)")

OFF = TilingConfig(enabled=False)
MIN_PSNR_DB = 40.0


# ---------------------------------------------------------------------- helpers


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR on the [-1, 1] range (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(4.0 / mse)).item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_latent(t: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A normalised latent [t, h, w, 48] ~ N(0, 1), what the denoiser hands to the decoder."""
    return torch.randn(t, h, w, 48, generator=torch.Generator().manual_seed(seed))


def smooth_video(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1]: smooth random structure (1/8-resolution noise, upsampled) plus a
    little fine noise, closer to real footage than white noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, frames, height // 8, width // 8, generator=g) * 2 - 1
    video = F.interpolate(base, size=(frames, height, width), mode="trilinear", align_corners=True)[0]
    return (video + 0.05 * torch.randn(video.shape, generator=g)).clamp(-1, 1)


@dataclass
class Peak:
    elements: int = 0


@contextmanager
def conv_peak(model: nn.Module) -> Iterator[Peak]:
    """Track the largest conv input or output (in elements) seen inside the `with` block.

    The VAE's activation peak is one chunk's feature map at the stage with the most elements, so
    the biggest tensor entering or leaving a conv is a device-independent proxy for peak memory.
    """
    peak = Peak()

    def hook(module, inputs, output) -> None:
        peak.elements = max(peak.elements, inputs[0].numel(), output.numel())

    convs = [m for m in model.modules() if isinstance(m, (CausalConv3d, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in convs]
    try:
        yield peak
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    if not CKPT.is_file():
        pytest.skip(f"golden VAE not found at {CKPT}")
    return load_vae(CKPT)  # the tiny golden VAE: encoder width 8, decoder width 16


# ---------------------------------------------------------------------- layout and weights


@pytest.mark.parametrize("n", [1, 7, 16, 17, 20, 24, 33, 40, 48, 97])
@pytest.mark.parametrize(("tile", "overlap"), [(16, 4), (12, 4), (32, 8), (5, 0), (8, 7)])
def test_tile_spans_cover_with_overlap(n, tile, overlap):
    spans = tile_spans(n, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(stop - start == min(tile, n) for start, stop in spans)
    for (s0, e0), (s1, _) in pairwise(spans):
        assert s0 < s1 and e0 - s1 >= overlap  # advances, and shares at least `overlap` cells
    if n > tile:  # the fewest tiles: one fewer could not reach n with `overlap`-cell overlaps
        assert (len(spans) - 2) * (tile - overlap) + tile < n


def test_tile_spans_examples():
    assert tile_spans(40, 16, 4) == [(0, 16), (12, 28), (24, 40)]
    assert tile_spans(24, 16, 4) == [(0, 16), (8, 24)]  # spread evenly rather than snapped
    assert tile_spans(20, 12, 4) == [(0, 12), (8, 20)]
    assert tile_spans(10, 32, 8) == [(0, 10)]
    assert plan_tiles(20, 40, TilingConfig(tile=16, overlap=4)) == [
        (ys, xs) for ys in [(0, 16), (4, 20)] for xs in [(0, 16), (12, 28), (24, 40)]
    ]


@pytest.mark.parametrize(
    ("n", "tile", "overlap", "scale"), [(40, 16, 4, 1), (24, 16, 4, 16), (33, 16, 8, 2), (9, 6, 5, 1)]
)
def test_axis_weights_partition_of_unity(n, tile, overlap, scale):
    spans = tile_spans(n, tile, overlap)
    weights = axis_weights(spans, scale)
    total = torch.zeros(n * scale, dtype=torch.float64)
    for (start, stop), w in zip(spans, weights):
        assert w.numel() == (stop - start) * scale and bool((w > 0).all())
        total[start * scale : stop * scale] += w.double()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    # No ramp at the image border: the first and last samples belong to one tile only.
    assert weights[0][0] == 1.0 and weights[-1][-1] == 1.0
    if 2 * overlap <= tile:  # bands of two tiles only: the first tile's weight falls across its band
        band = weights[0][spans[1][0] * scale :]
        assert bool((band[1:] < band[:-1]).all()) and band[-1] < 0.5 < band[0]


def test_axis_weights_lone_tile_is_exactly_one():
    (w,) = axis_weights([(0, 5)], 16)
    assert torch.equal(w, torch.ones(80))


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 8, "overlap": 8}, "smaller than the tile"),
        ({"tile": 8, "overlap": 12}, "smaller than the tile"),
        ({"tile": 0}, "tile must be >= 1"),
        ({"overlap": -1}, "overlap must be >= 0"),
        ({"threshold": -5}, "threshold must be >= 0"),
        ({"tile": 16.0}, "tile must be an integer"),
        ({"tile": True}, "tile must be an integer"),
        ({"enabled": "yes"}, "enabled must be True, False or None"),
        ({"global_attention": None}, "global_attention must be True or False"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(TilingError, match=match) as info:
        TilingConfig(**kwargs)
    # A usage error for the CLI (one-line message, exit 2) and a ValueError for library callers.
    assert isinstance(info.value, LanceUsageError) and isinstance(info.value, ValueError)


def test_defaults_and_auto_threshold():
    cfg = TilingConfig()
    assert (cfg.tile, cfg.overlap, cfg.enabled, cfg.threshold, cfg.global_attention) == (32, 8, None, 36, True)
    assert not cfg.active(36, 36)  # 576 px square stays untiled
    assert cfg.active(37, 10) and cfg.active(10, 48)
    assert TilingConfig(enabled=True).active(1, 1)
    assert not TilingConfig(enabled=False).active(200, 200)


# ---------------------------------------------------------------------- hooks in WanVAE


def _spy(monkeypatch, name: str) -> list:
    """Replace `vae.tiled_<name>` as seen by WanVAE with a recording pass-through."""
    calls = []
    real = getattr(vae_module, name)

    def spy(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("cfg"))
        return real(*args, **kwargs)

    monkeypatch.setattr(vae_module, name, spy)
    return calls


@needs_ckpt
def test_auto_mode_off_below_threshold(vae, monkeypatch):
    dec_calls, enc_calls = _spy(monkeypatch, "tiled_decode"), _spy(monkeypatch, "tiled_encode")
    latent = random_latent(1, 4, 6, seed=1)
    video = smooth_video(1, 64, 96, seed=1)
    # Default (auto, threshold 36): a 4×6 latent is far below it, so the plain path runs.
    assert torch.equal(vae.decode(latent), vae.decode(latent, OFF))
    assert torch.equal(vae.encode(video)[0], vae.encode(video, OFF)[0])
    assert dec_calls == [] and enc_calls == []
    # With a threshold below the grid, auto mode switches tiling on through the same entry points.
    low = TilingConfig(tile=4, overlap=2, threshold=5)
    vae.decode(latent, low)
    vae.encode(video, low)
    assert dec_calls == [low] and enc_calls == [low]


@needs_ckpt
@pytest.mark.parametrize("global_attention", [True, False])
@pytest.mark.parametrize("t", [1, 3])
def test_single_tile_equals_untiled_exactly(vae, t, global_attention):
    """One tile covering the grid reproduces the untiled VAE bit for bit, which also proves that
    the split streams visit the same modules in the same order as `Decoder3d/Encoder3d.forward`."""
    cfg = TilingConfig(tile=8, overlap=2, enabled=True, global_attention=global_attention)
    latent = random_latent(t, 4, 6, seed=2)
    assert torch.equal(tiled_decode(vae, latent, cfg), vae.decode(latent, OFF))
    video = smooth_video(1 + 4 * (t - 1), 64, 96, seed=2)
    tiled, plain = tiled_encode(vae, video, cfg), vae.encode(video, OFF)
    assert torch.equal(tiled[0], plain[0]) and torch.equal(tiled[1], plain[1])


@needs_ckpt
def test_single_tile_equals_untiled_exactly_bf16():
    """Same in bf16: the fp32 blend canvas holds bf16 values ×1 exactly, so nothing is rounded."""
    bf = load_vae(CKPT, dtype=torch.bfloat16)
    cfg = TilingConfig(tile=8, overlap=2, enabled=True)
    latent = random_latent(2, 4, 6, seed=6)
    assert torch.equal(tiled_decode(bf, latent, cfg), bf.decode(latent, OFF))
    video = smooth_video(5, 64, 96, seed=6)
    tiled, plain = tiled_encode(bf, video, cfg), bf.encode(video, OFF)
    assert torch.equal(tiled[0], plain[0]) and torch.equal(tiled[1], plain[1])


@needs_ckpt
def test_tiled_rejects_bad_shapes(vae):
    with pytest.raises(ValueError, match=r"\[t, h, w, 48\]"):
        tiled_decode(vae, torch.zeros(1, 4, 4, 16))
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        tiled_encode(vae, torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        tiled_encode(vae, torch.zeros(3, 1, 64, 72))


# ---------------------------------------------------------------------- parity and memory

DECODE_CASES = {
    # name: (latent t, h, w, tile, overlap) — grids that force several tiles
    "image": (1, 24, 40, 16, 4),  # 2 × 3 tiles, 384×640 px
    "video": (3, 20, 20, 12, 4),  # 2 × 2 tiles, 9 frames of 320×320 px
}


@pytest.fixture(scope="module")
def decoded(vae) -> dict:
    """Per case: untiled and tiled decodes of one random latent, with their conv peaks."""
    out = {}
    for name, (t, h, w, tile, overlap) in DECODE_CASES.items():
        latent = random_latent(t, h, w, seed=3)
        cfg = TilingConfig(tile=tile, overlap=overlap, enabled=True)
        with conv_peak(vae) as plain_peak:
            plain = vae.decode(latent, OFF)
        with conv_peak(vae) as tiled_peak:
            tiled = vae.decode(latent, cfg)
        out[name] = {
            "plain": plain, "tiled": tiled, "latent": latent, "cfg": cfg,
            "plain_peak": plain_peak.elements, "tiled_peak": tiled_peak.elements,
        }  # fmt: skip
    return out


@needs_ckpt
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_tiled_decode_psnr(decoded, case):
    d = decoded[case]
    assert d["tiled"].shape == d["plain"].shape and d["tiled"].dtype == torch.float32
    assert d["tiled"].abs().max() <= 1.0
    value = psnr(d["tiled"], d["plain"])
    tiles = len(plan_tiles(*d["latent"].shape[1:3], d["cfg"]))
    print(f"\n{case}: tiled vs untiled decode PSNR {value:.2f} dB ({tiles} tiles)")
    assert value >= MIN_PSNR_DB


@needs_ckpt
def test_tiled_decode_peak_is_smaller(decoded):
    """Largest conv activation during decode: one tile's instead of the whole frame's."""
    d = decoded["image"]
    ratio = d["tiled_peak"] / d["plain_peak"]
    print(f"\nlargest conv tensor: untiled {d['plain_peak']:,} elements, tiled {d['tiled_peak']:,} ({ratio:.2f}×)")
    # 16×16-cell tiles of a 24×40 grid hold 256/960 of the cells; allow for the conv padding.
    assert ratio < 0.35


@needs_ckpt
@pytest.mark.slow
def test_per_tile_attention_mode_psnr(decoded, vae):
    """The PR #43 scheme (whole VAE per tile, attention within the tile) is lower in PSNR."""
    d = decoded["image"]
    with conv_peak(vae) as peak:
        local = vae.decode(d["latent"], TilingConfig(tile=16, overlap=4, enabled=True, global_attention=False))
    value = psnr(local, d["plain"])
    print(f"\nper-tile attention: PSNR {value:.2f} dB, largest conv tensor {peak.elements:,}")
    assert value >= 30.0 and peak.elements <= d["tiled_peak"]


ENCODE_CASES = {
    # name: (frames, height, width, tile, overlap, max relative error of the latent)
    "image_16_4": (1, 384, 640, 16, 4, 0.04),
    "image_default": (1, 384, 640, 32, 8, 0.01),
    "video_12_4": (9, 192, 320, 12, 4, 0.04),
}


@needs_ckpt
@pytest.mark.parametrize("case", list(ENCODE_CASES))
def test_tiled_encode_close(vae, case):
    frames, height, width, tile, overlap, max_rel = ENCODE_CASES[case]
    video = smooth_video(frames, height, width, seed=4)
    cfg = TilingConfig(tile=tile, overlap=overlap, enabled=True)
    with conv_peak(vae) as plain_peak:
        latent, log_var = vae.encode(video, OFF)
    with conv_peak(vae) as tiled_peak:
        t_latent, t_log_var = vae.encode(video, cfg)
    assert t_latent.shape == latent.shape and t_log_var.shape == log_var.shape
    lat_err, lv_err = rel_err(t_latent, latent), rel_err(t_log_var, log_var)
    print(f"\n{case}: tiled vs untiled encode rel-L2 latent {lat_err:.4f}, log_var {lv_err:.4f}, "
          f"largest conv tensor {tiled_peak.elements:,} vs {plain_peak.elements:,}")
    assert lat_err <= max_rel and lv_err <= 1.25 * max_rel
    assert tiled_peak.elements < plain_peak.elements


@needs_ckpt
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiled_decode_cuda_peak_memory():
    """On a GPU, the allocator's peak during a 768² decode drops with tiling."""
    gpu = load_vae(CKPT, device="cuda", parts=("decoder",))
    latent = random_latent(2, 48, 48, seed=5).cuda()

    def peak(cfg: TilingConfig) -> tuple[int, torch.Tensor]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = gpu.decode(latent, cfg)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out

    plain_bytes, plain = peak(OFF)
    tiled_bytes, tiled = peak(TilingConfig(tile=16, overlap=4, enabled=True))
    print(f"\ncuda peak: untiled {plain_bytes / 2**20:.1f} MiB, tiled {tiled_bytes / 2**20:.1f} MiB, "
          f"PSNR {psnr(tiled, plain):.2f} dB")
    assert tiled_bytes < plain_bytes
    assert psnr(tiled, plain) >= MIN_PSNR_DB
