"""Graph shapes per resolution preset: what each exported part is traced at and profiled for.

A preset (``lance_deploy.media.preprocess.PRESETS``) fixes the VAE and ViT bucket areas. From it:

* ``vit``: a static patch grid of ONE temporal slice of the chosen aspect bucket. The ViT never
  attends across temporal slices (windows and "full" blocks are per slice, the rotary is 2-D), so a
  video is the per-slice graph run once per slice and the token rows concatenated.
* ``vae-decoder`` / ``vae-encoder``: a static latent tile: the whole aspect bucket when it is at
  most 32 cells a side (then a tiled decode equals the plain one exactly), else 32-cell tiles that
  overlap and are blended outside the graph. Blending is not exact: on the random golden VAE a
  2-cell overlap measured ~30 dB PSNR against the untiled decode, so prefer whole-bucket tiles.
* ``gen-layer`` / ``und-layer``: token counts are dynamic axes (verified at two sizes in the
  tests); the preset only sets the TensorRT optimisation profile (min / opt / max).
"""

from __future__ import annotations

from dataclasses import dataclass

from lance_deploy.core.errors import LanceUsageError

PARTS = ("gen-layer", "und-layer", "vit", "vae-decoder", "vae-encoder")
ASPECTS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")  # = preprocess.ASPECT_RATIOS, upstream order

VAE_STRIDE = 16  # pixels per latent cell
VIT_CROP = 28  # one 2x2 merge unit of 14-px patches
MAX_TILE = 32  # latent cells; a 512-px tile keeps TensorRT tactic memory bounded (anchors §5)
MAX_LATENT_FRAMES = 31  # upstream max_num_frames 121 -> 31 latent frames
TRACE_TOKENS = (18, 8)  # (n, Lc) the layer graphs are traced at; dynamic afterwards


@dataclass(frozen=True)
class Profile:
    """TensorRT min / opt / max of one dynamic axis."""

    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class PresetShapes:
    """Everything shape-related that one preset implies for the exported graphs."""

    preset: str
    aspect: str
    video: bool
    vit_grid: tuple[int, int, int]  # (1, h, w) in 14-px patches: one temporal slice
    vae_tile: tuple[int, int]  # latent cells (h, w) of one tile
    gen_tokens: Profile  # n = 2 markers + latent rows
    und_tokens: Profile  # query chunk of the understanding layer
    context: Profile  # cached keys Lc

    @property
    def vae_overlap(self) -> int:
        """Latent cells shared by neighbouring tiles (blended outside the graph)."""
        return max(1, min(self.vae_tile) // 4)


def _bucket_sides(area_side: int) -> list[tuple[int, int]]:
    from lance_deploy.media.preprocess import bucket_size

    # bucket_size picks the bucket nearest to h/w; feeding the nominal ratio returns that bucket.
    return [bucket_size(int(r.split(":")[1]) * 100, int(r.split(":")[0]) * 100, area_side) for r in ASPECTS]



def preset_shapes(name: str, aspect: str = "1:1", vae_tile: tuple[int, int] | None = None) -> PresetShapes:
    """Resolve a preset name and aspect bucket into graph shapes; usage error if unknown.

    `vae_tile` overrides the VAE tile (latent cells), e.g. for smaller tiles on a small GPU.
    """
    from lance_deploy.media.preprocess import PRESETS

    if name not in PRESETS:
        raise LanceUsageError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    if aspect not in ASPECTS:
        raise LanceUsageError(f"--aspect {aspect!r} is unknown; choose one of {', '.join(ASPECTS)}")
    p = PRESETS[name]
    video = name.startswith("video")
    vae_buckets = _bucket_sides(p.vae_side)
    bh, bw = vae_buckets[ASPECTS.index(aspect)]
    tile = vae_tile or (min(MAX_TILE, bh // VAE_STRIDE), min(MAX_TILE, bw // VAE_STRIDE))
    if min(tile) < 2:
        raise LanceUsageError(f"--vae-tile {tile[0]}x{tile[1]}: tiles need at least 2 latent cells a side")
    vh, vw = _bucket_sides(p.vit_side)[ASPECTS.index(aspect)]
    vh, vw = vh - vh % VIT_CROP, vw - vw % VIT_CROP
    frames = MAX_LATENT_FRAMES if video else 1
    cells = [(h // VAE_STRIDE) * (w // VAE_STRIDE) for h, w in vae_buckets]
    square = (p.vae_side // VAE_STRIDE) ** 2
    n_max = 2 + max(cells) * frames
    gen = Profile(3, 2 + square * (frames if video else 1), n_max)
    # The prefix holds text, ViT tokens and (for edits) clean condition latents: bounded by ~2 targets.
    context = Profile(1, min(1024, n_max), 2 * n_max + 2048)
    und = Profile(1, 1, 2048 + (vh // VIT_CROP) * (vw // VIT_CROP) * frames)
    return PresetShapes(name, aspect, video, (1, vh // 14, vw // 14), tile, gen, und, context)
