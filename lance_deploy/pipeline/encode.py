"""Turn a request's raw media into model inputs: ViT tokens and clean VAE latents."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.media.preprocess import PRESETS, sample_frame_indices, vae_pixels, vit_pixels
from lance_deploy.pipeline.tasks import TaskRequest


@dataclass
class EncodedMedia:
    vit_tokens: torch.Tensor | None = None  # [n, D]
    vit_grids: list = field(default_factory=list)  # ViT grid_thw per block: (T/2, H/14, W/14)
    source_latents: list = field(default_factory=list)  # edit sources, [t, h, w, 48]
    cond_latent: torch.Tensor | None = None  # i2v: the image's latent [1, h, w, 48]
    notes: list = field(default_factory=list)


def area_sides(req: TaskRequest) -> tuple[int, int]:
    if req.preset not in PRESETS:
        raise LanceUsageError(f"--resolution {req.preset!r}: expected one of {', '.join(PRESETS)}")
    p = PRESETS[req.preset]
    # `is None`, not `or`: an override of 0 is refused by validation, never read as "no override"
    vae = p.vae_side if req.vae_area_side is None else req.vae_area_side
    return vae, p.vit_side if req.vit_area_side is None else req.vit_area_side


def _frames(req: TaskRequest, notes: list) -> tuple[np.ndarray, bool]:
    """The media as uint8 [N, H, W, 3]; videos resampled to 12 fps, at most 6 s, 4k+1 frames."""
    if req.spec.media == "image":
        return req.image[None], False
    video, fps = req.video, req.video_fps
    idx = sample_frame_indices(len(video), fps)
    if not idx:
        raise LanceUsageError(f"--video: {len(video)} frames at {fps} fps give no frames at 12 fps")
    notes.append(f"video: {len(video)} frames at {fps:g} fps -> {len(idx)} frames at 12 fps")
    return video[idx], True


@torch.no_grad()
def encode_media(c, req: TaskRequest, device, dtype, on_phase=None) -> EncodedMedia:
    """Run the ViT and the VAE encoder on the request's media, as the task needs
    (`on_phase` is called with "encode_vit" / "encode_vae" before each)."""
    on_phase = on_phase or (lambda name: None)
    out = EncodedMedia()
    if req.spec.media is None:
        return out
    vae_side, vit_side = area_sides(req)
    frames, is_video = _frames(req, out.notes)
    if req.spec.vit:
        from lance_deploy.model.vit import patchify_video_with_merge

        on_phase("encode_vit")
        px = vit_pixels(frames, vit_side, is_video)
        patches, grid = patchify_video_with_merge(px)
        out.vit_tokens = c.vit(patches.to(device, dtype), grid.to(device))
        out.vit_grids = [tuple(int(v) for v in grid[0])]
    if req.spec.vae_encoder:
        on_phase("encode_vae")
        px = vae_pixels(frames, vae_side, is_video)
        latent, _ = c.vae.encode(px.to(device, dtype))
        if req.task == "i2v":
            out.cond_latent = latent
        else:
            out.source_latents = [latent]
    return out
