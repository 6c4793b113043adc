"""Spatially tiled encode/decode for the Wan2.2 VAE, so peak memory follows the tile, not the frame.

The VAE already streams time (one latent frame, or four pixel frames, per chunk), so its activation
peak is one chunk at *full spatial size* (community PR #43 measured > 12 GB at 768²). Here
the frame is cut into overlapping tiles, measured in latent cells (1 cell = 16×16 pixels), and every
tile runs through the whole temporal stream with its own `StreamCache`, as an independent small
video would. Tile results are feather-blended: inside an overlap band each tile's weight ramps
linearly toward its interior edge, so the pixels it computed with a zero-padded (wrong)
neighbourhood count least; image borders get no ramp. The 1-D weights are normalised to sum to one
at every position, and since the tile grid is a product of two 1-D tilings, the 2-D products sum to
one as well, so no weight canvas is needed.

Two modes (`TilingConfig.global_attention`):

* True (default): only the *high-resolution* stages are tiled. Both networks have one non-local op,
  the single-head self-attention in their middle block, which mixes every position of a frame and
  runs at latent resolution. Tiling it replaces the frame-wide context by a tile-wide one and
  shifts whole tiles, not just their edges (tiny checkpoint, 24×40 latent, 16/4 tiles: 35 dB
  against the untiled decode, vs 50 dB in this mode). So the decoder first runs conv2 → conv1 → middle over the full latent frame (cheap:
  latent resolution, 4·dec_dim channels) and stores that for all frames; each tile then streams the
  up-sampling stages and the head. The encoder tiles conv1 + the down-sampling stages, blends their
  latent-resolution features, and runs middle → head → conv1 over the whole latent frame.
  Extra memory: the stored features, t × 4·width × h × w (fp32 for the encoder); at full size
  and 768² that is 4.5 MiB per latent frame in bf16, against 576 MiB for the single largest
  activation of an untiled 4-frame decode chunk.
* False: the whole VAE runs per tile (the community PR #43 scheme): memory is strictly one tile's
  activations plus the output canvas, the attention sees one tile only; the encoder blends `mu`
  and `log_var`.

In the default mode, the result differs from the untiled VAE only through the convolutions that
see zeros instead of neighbours near interior tile edges; the overlap keeps that small. In both
modes a lone tile covering everything reproduces the untiled VAE exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

import torch
from torch import Tensor, nn

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.model.vae_blocks import StreamCache, patchify, unpatchify

__all__ = [
    "SPATIAL_FACTOR",
    "TilingConfig",
    "TilingError",
    "axis_weights",
    "plan_tiles",
    "tile_spans",
    "tiled_decode",
    "tiled_encode",
]

SPATIAL_FACTOR = 16  # pixels per latent cell along each spatial axis

Span = tuple[int, int]  # [start, stop) in latent cells


class TiledVAE(Protocol):
    """What the tiler uses of a `WanVAE` (stated here because vae.py imports this module)."""

    z_dim: int
    encoder: nn.Module  # Encoder3d: high_res / low_res
    decoder: nn.Module  # Decoder3d: low_res / high_res
    conv1: nn.Module
    conv2: nn.Module

    def part_weight(self, part: str) -> Tensor: ...
    def normalize(self, mu: Tensor) -> Tensor: ...
    def denormalize(self, z: Tensor) -> Tensor: ...
    def encode_frames(self, x: Tensor, cache: StreamCache) -> tuple[Tensor, Tensor]: ...
    def decode_frames(self, z: Tensor, cache: StreamCache) -> Tensor: ...


class TilingError(LanceUsageError, ValueError):
    """A tiling configuration that cannot work (bad tile size, overlap or threshold)."""


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `tile=True` is almost certainly a mistake, so refuse it explicitly.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TilingError(f"VAE tiling: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise TilingError(f"VAE tiling: {name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class TilingConfig:
    """How to tile the VAE spatially; sizes are in latent cells (1 cell = 16×16 pixels).

    tile: side of a tile. overlap: cells shared by neighbouring tiles (the feather band); it must be
    smaller than `tile`, and the real overlap can come out larger because tiles are spread evenly.
    enabled: True = always tile, False = never, None = auto: tile when the latent height or width
    exceeds `threshold` cells (default 36 = 576 px; the untiled 768² decode no longer fits 12 GB).
    global_attention: run the latent-resolution middle blocks (frame-wide attention) once over the
    whole frame and tile only the high-resolution stages (see the module docstring).
    """

    tile: int = 32
    overlap: int = 8
    enabled: bool | None = None
    threshold: int = 36
    global_attention: bool = True

    def __post_init__(self) -> None:
        _check_int("tile", self.tile, 1)
        _check_int("overlap", self.overlap, 0)
        _check_int("threshold", self.threshold, 0)
        if self.overlap >= self.tile:
            raise TilingError(
                f"VAE tiling: overlap ({self.overlap}) must be smaller than the tile ({self.tile} cells), "
                "otherwise the tiles never advance"
            )
        if self.enabled not in (None, True, False):
            raise TilingError(f"VAE tiling: enabled must be True, False or None (auto), got {self.enabled!r}")
        if not isinstance(self.global_attention, bool):
            raise TilingError(f"VAE tiling: global_attention must be True or False, got {self.global_attention!r}")

    def active(self, h: int, w: int) -> bool:
        """Whether a latent grid of h × w cells gets tiled under this config."""
        if self.enabled is None:
            return max(h, w) > self.threshold
        return self.enabled


# ---------------------------------------------------------------------- tile layout and weights


def tile_spans(n: int, tile: int, overlap: int) -> list[Span]:
    """Cover [0, n) with the fewest tiles of `tile` cells that overlap by at least `overlap`.

    Starts are spread evenly between 0 and n - tile instead of stepping by tile - overlap and
    snapping the last tile to the edge: the snapped layout can leave one huge overlap, or even
    three tiles on the same cells, while even spacing keeps every band about the same width.
    """
    if n <= tile:
        return [(0, n)]
    stride = tile - overlap
    gaps = -(-(n - tile) // stride)  # ceil: the number of steps needed, each at most `stride`
    # Rounded i·(n - tile)/gaps; consecutive starts differ by at most ceil((n - tile)/gaps) <= stride.
    starts = [(i * (n - tile) + gaps // 2) // gaps for i in range(gaps + 1)]
    return [(s, s + tile) for s in starts]


def plan_tiles(h: int, w: int, cfg: TilingConfig) -> list[tuple[Span, Span]]:
    """All (rows, cols) tiles of an h × w latent grid, row-major; one tile when it fits."""
    return [(ys, xs) for ys in tile_spans(h, cfg.tile, cfg.overlap) for xs in tile_spans(w, cfg.tile, cfg.overlap)]


def _ramp(length: int) -> Tensor:
    """Rising linear ramp (k + ½)/length, k = 0..length-1: a ramp and its mirror image sum to 1
    everywhere, and no value is 0, so every covered position keeps a positive weight."""
    return (torch.arange(length, dtype=torch.float64) + 0.5) / length


def axis_weights(spans: Sequence[Span], scale: int) -> list[Tensor]:
    """Per-tile 1-D blend weights along one axis, `scale` samples per cell, normalised to sum to 1.

    A tile ramps up over its overlap with the previous tile and down over its overlap with the next
    one; edges on the image border stay at 1. Computed in float64 (they are tiny) so that the
    normalisation is exact to fp32 and a lone tile gets weight exactly 1.
    """
    n = spans[-1][1] * scale
    raw = []
    for i, (start, stop) in enumerate(spans):
        w = torch.ones((stop - start) * scale, dtype=torch.float64)
        # Overlaps with the previous / next tile (0 when tiles merely abut, e.g. overlap=0).
        lo = (spans[i - 1][1] - start) * scale if i > 0 else 0
        hi = (stop - spans[i + 1][0]) * scale if i + 1 < len(spans) else 0
        if lo > 0:
            w[:lo] = _ramp(lo)
        if hi > 0:
            # With overlap > tile/2 the two ramps of one tile meet; min keeps the weight continuous.
            w[-hi:] = torch.minimum(w[-hi:], _ramp(hi).flip(0))
        raw.append(w)
    total = torch.zeros(n, dtype=torch.float64)
    for (start, stop), w in zip(spans, raw):
        total[start * scale : stop * scale] += w
    return [(w / total[start * scale : stop * scale]).float() for (start, stop), w in zip(spans, raw)]


TileFn = Callable[[Span, Span], Sequence[Tensor]]


def _blend_tiles(h: int, w: int, cfg: TilingConfig, scale: int, device: torch.device, run: TileFn,
                 tick: Callable[[], object] | None = None) -> list[Tensor]:
    """Run `run(rows, cols)` for every tile and feather-blend its outputs into fp32 canvases.

    `run` returns tensors [B, C, T, rows·scale, cols·scale]; the canvases are [B, C, T, h·scale,
    w·scale], allocated from the first tile's shapes. Each tile's outputs are dropped before the
    next tile runs, so only one tile's activations are alive at a time.
    """
    weights = {}
    for axis, n in (("y", h), ("x", w)):
        spans = tile_spans(n, cfg.tile, cfg.overlap)
        weights.update({(axis, s): wt.to(device) for s, wt in zip(spans, axis_weights(spans, scale))})
    canvases: list[Tensor] = []
    for ys, xs in plan_tiles(h, w, cfg):
        outs = run(ys, xs)
        if not canvases:
            canvases = [torch.zeros(*o.shape[:-2], h * scale, w * scale, device=device) for o in outs]
        wgt = weights["y", ys].view(-1, 1) * weights["x", xs].view(1, -1)
        for canvas, out in zip(canvases, outs):
            canvas[..., ys[0] * scale : ys[1] * scale, xs[0] * scale : xs[1] * scale].add_(out.float() * wgt)
        del outs  # free the tile before the next one runs
        if tick is not None:
            tick()
    return canvases


def _crop(x: Tensor, ys: Span, xs: Span, scale: int) -> Tensor:
    """x[..., rows, cols] for spans in cells, `scale` samples per cell, as a contiguous tensor."""
    return x[..., ys[0] * scale : ys[1] * scale, xs[0] * scale : xs[1] * scale].contiguous()


# ---------------------------------------------------------------------- split VAE streams
#
# `Encoder3d` / `Decoder3d` are cut at the middle block by their `high_res` / `low_res` parts, which
# their own forward composes, so with one tile the split streams equal the untiled VAE bit for bit.


def _stream(x: Tensor, bounds: Sequence[int], cache: StreamCache, step) -> Tensor:
    """Feed x[:, :, bounds[i]:bounds[i+1]] through `step(chunk, cache, first_chunk)` one chunk at a
    time with one cache, concatenating the outputs over time."""
    outs = []
    for start, stop in pairwise(bounds):
        first = cache.chunks_done == 0
        cache.start_chunk()
        outs.append(step(x[:, :, start:stop].contiguous(), cache, first))
        cache.end_chunk()
    return torch.cat(outs, dim=2)


def _encoder_bounds(frames: int) -> list[int]:
    """Chunk bounds of a fresh encode stream: the first frame alone, then 4 at a time."""
    return [0, *range(1, frames + 1, 4)]


# ---------------------------------------------------------------------- public API


@torch.no_grad()
def tiled_decode(vae: TiledVAE, latent: Tensor, cfg: TilingConfig | None = None, tick=None) -> Tensor:
    """Normalised latent [t, h, w, 48] -> video [3, 1+4(t-1), 16h, 16w] in [-1, 1], fp32, decoded in
    spatial tiles of `cfg.tile` cells (always tiled; `WanVAE.decode` makes the auto decision).
    `tick()` follows each finished tile (progress)."""
    cfg = TilingConfig() if cfg is None else cfg
    ref = vae.part_weight("decoder")
    if latent.dim() != 4 or latent.shape[-1] != vae.z_dim:
        raise ValueError(f"VAE tiled decode expects [t, h, w, {vae.z_dim}], got {list(latent.shape)}")
    t, h, w, _ = latent.shape
    # Denormalising is per channel, so doing it once up front equals doing it per tile.
    z = vae.denormalize(latent.to(ref.device).permute(3, 0, 1, 2).unsqueeze(0)).to(ref.dtype)  # [1, 48, t, h, w]
    frames = list(range(t + 1))  # one latent frame per chunk
    if cfg.global_attention:
        # conv2 is 1×1×1 and the low part runs on the whole frame with a cache of its own.
        src = _stream(vae.conv2(z), frames, StreamCache(), lambda chunk, c, first: vae.decoder.low_res(chunk, c))

        def run(ys: Span, xs: Span) -> tuple[Tensor]:
            # A fresh cache per tile: each tile is its own causal stream over all latent frames.
            tile = _crop(src, ys, xs, 1)
            return (unpatchify(_stream(tile, frames, StreamCache(), vae.decoder.high_res)),)

    else:

        def run(ys: Span, xs: Span) -> tuple[Tensor]:
            return (vae.decode_frames(_crop(z, ys, xs, 1), StreamCache()),)

    (canvas,) = _blend_tiles(h, w, cfg, SPATIAL_FACTOR, ref.device, run, tick)
    return canvas[0].clamp_(-1.0, 1.0)


@torch.no_grad()
def tiled_encode(vae: TiledVAE, video: Tensor, cfg: TilingConfig | None = None,
                 tick=None) -> tuple[Tensor, Tensor]:
    """Video [3, T, H, W] in [-1, 1] -> (latent [t, h, w, 48] normalised, log_var [48, t, h, w] raw),
    fp32, encoded in spatial tiles of `cfg.tile` latent cells (16·tile pixels).

    The stitched `mu` is normalised only at the end, and `log_var` is returned raw, so a caller that
    samples `mu + exp(½·log_var)·ε` draws its noise once over the whole latent, never per tile.
    """
    cfg = TilingConfig() if cfg is None else cfg
    ref = vae.part_weight("encoder")
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"VAE tiled encode expects [3, T, H, W], got {list(video.shape)}")
    _, frames, height, width = video.shape
    if (frames - 1) % 4 or height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
        raise ValueError(f"VAE encode needs T = 4k+1 and H, W multiples of 16, got T={frames}, {height}x{width}")
    x = video.to(device=ref.device, dtype=ref.dtype).unsqueeze(0)  # [1, 3, T, H, W]
    h, w = height // SPATIAL_FACTOR, width // SPATIAL_FACTOR
    # Tiles are cut on the 16-pixel grid, so every stride-2 stage inside sees aligned input.
    if cfg.global_attention:

        def run(ys: Span, xs: Span) -> tuple[Tensor]:
            tile = patchify(_crop(x, ys, xs, SPATIAL_FACTOR))
            return (_stream(tile, _encoder_bounds(frames), StreamCache(),
                            lambda chunk, c, first: vae.encoder.high_res(chunk, c)),)

        (feats,) = _blend_tiles(h, w, cfg, 1, ref.device, run, tick)
        t = feats.shape[2]
        low = _stream(feats.to(ref.dtype), list(range(t + 1)), StreamCache(),
                      lambda chunk, c, first: vae.encoder.low_res(chunk, c))
        mu, log_var = vae.conv1(low).chunk(2, dim=1)
    else:

        def run(ys: Span, xs: Span) -> tuple[Tensor, Tensor]:
            return vae.encode_frames(_crop(x, ys, xs, SPATIAL_FACTOR), StreamCache())

        mu, log_var = _blend_tiles(h, w, cfg, 1, ref.device, run, tick)
    latent = vae.normalize(mu)[0].permute(1, 2, 3, 0).contiguous()  # [t, h, w, 48]
    return latent, log_var[0].float()
