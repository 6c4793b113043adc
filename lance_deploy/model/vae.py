"""Wan2.2 48-channel video VAE as bundled with Lance (`Wan2.2_VAE.pth`).

Compression is 16× in space (2× pixel-unshuffle + three stride-2 stages) and 4× in time, causally:
T = 4k+1 pixel frames <-> t = k+1 latent frames, latent frame 0 depending on pixel frame 0 only.
The encoder streams the video in chunks of 1, 4, 4, ... frames and the decoder one latent frame at
a time; the per-stream causal state lives in a `StreamCache` (see `vae_blocks`), so a caller can
run several independent streams (e.g. spatial tiles), each with its own cache.

Latents handed to the rest of Lance are per-channel normalised: `(mu - mean_c) / std_c` with the
48 hard-coded Wan2.2 statistics below, laid out [t, h, w, 48].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lance_deploy.core.errors import CheckpointError, LanceError
from lance_deploy.core.progress import bar
from lance_deploy.model.meta import build_on_meta
from lance_deploy.model.vae_blocks import (
    AttentionBlock,
    CausalConv3d,
    ChannelRMSNorm,
    DownStage,
    ResidualBlock,
    StreamCache,
    UpStage,
    patchify,
    unpatchify,
)
from lance_deploy.model.vae_tiling import (
    TilingConfig,
    plan_tiles,
    tiled_decode,
    tiled_encode,
)

PROGRESS_DELAY_S = 1.0  # VAE bars appear only for passes longer than this (under a command's progress mode)

__all__ = ["WanVAE", "load_vae", "LATENT_MEAN", "LATENT_STD", "StreamCache", "TilingConfig"]  # noqa: RUF022

Z_DIM = 48
DIM_MULT = (1, 2, 4, 4)
TEMPORAL_DOWN = (False, True, True)  # per encoder stage; the decoder uses it reversed
ENC_BLOCKS, DEC_BLOCKS = 2, 3

# Per-channel statistics of the Wan2.2 latent space (from upstream `Wan2_2_VAE.__init__`).
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


def _stats(device: torch.device) -> tuple[Tensor, Tensor]:
    """(mean, 1/std) as [1, 48, 1, 1, 1] fp32; upstream stores the reciprocal and multiplies."""
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=device).view(1, Z_DIM, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=torch.float32, device=device)
    return mean, inv_std.view(1, Z_DIM, 1, 1, 1)


def _stages(stage: type[DownStage] | type[UpStage], dims: list[int], blocks: int, temporal: tuple[bool, ...]):
    """One resampling stage per DIM_MULT step, from dims[i] to dims[i+1]; the last keeps its size in space."""
    last = len(DIM_MULT) - 1
    return nn.Sequential(*(
        stage(dims[i], dims[i + 1], blocks, temporal=i < len(temporal) and temporal[i], spatial=i != last)
        for i in range(len(DIM_MULT))
    ))  # fmt: skip


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(ChannelRMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1))


def _run_head(head: nn.Sequential, x: Tensor, cache: StreamCache) -> Tensor:
    norm, _, conv = head  # the conv needs the cache, which nn.Sequential cannot pass
    return conv(F.silu(norm(x)), cache)


class Encoder3d(nn.Module):
    """Patchified pixels (12 ch) -> 2·z_dim channels (mu ‖ log_var before the 1×1×1 `conv1`)."""

    def __init__(self, dim: int, z2: int):
        super().__init__()
        dims = [dim * m for m in (1, *DIM_MULT)]
        self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
        self.downsamples = _stages(DownStage, dims, ENC_BLOCKS, TEMPORAL_DOWN)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z2)

    def forward(self, x: Tensor, cache: StreamCache) -> Tensor:
        """One chunk [B, 12, T, H/2, W/2] (T = 1 first, then 4) -> [B, 2z, T', H/16, W/16]."""
        return self.low_res(self.high_res(x, cache), cache)

    def high_res(self, x: Tensor, cache: StreamCache) -> Tensor:
        """conv1 + the down-sampling stages: patchified pixels -> latent-resolution features."""
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache)
        return x

    def low_res(self, x: Tensor, cache: StreamCache) -> Tensor:
        """The middle block (with the frame-wide attention) + head, at latent resolution."""
        for block in self.middle:
            x = block(x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """z_dim channels -> patchified pixels (12 ch), one latent frame per chunk."""

    def __init__(self, dim: int, z_dim: int):
        super().__init__()
        dims = [dim * m for m in (DIM_MULT[-1], *DIM_MULT[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = _stages(UpStage, dims, DEC_BLOCKS, TEMPORAL_DOWN[::-1])
        self.head = _head(dims[-1], 12)

    def forward(self, x: Tensor, cache: StreamCache, first_chunk: bool) -> Tensor:
        """One latent frame [B, z, 1, h, w] -> [B, 12, 1 or 4, 8h, 8w]."""
        return self.high_res(self.low_res(x, cache), cache, first_chunk)

    def low_res(self, x: Tensor, cache: StreamCache) -> Tensor:
        """conv1 + the middle block (with the frame-wide attention), at latent resolution."""
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        return x

    def high_res(self, x: Tensor, cache: StreamCache, first_chunk: bool) -> Tensor:
        """The up-sampling stages + head: middle features -> 12 patchified channels."""
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk)
        return _run_head(self.head, x, cache)


class WanVAE(nn.Module):
    """The Wan2.2 48-channel VAE; parameter names equal the keys of `Wan2.2_VAE.pth`.

    Computation runs in the dtype and on the device of the weights; `encode`/`decode` return fp32.
    """

    def __init__(self, enc_dim: int = 160, dec_dim: int = 256, z_dim: int = Z_DIM):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(enc_dim, z_dim * 2)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dec_dim, z_dim)

    @staticmethod
    def dims_from_state_dict(sd: Mapping[str, Tensor]) -> tuple[int, int]:
        """(enc_dim, dec_dim) from `encoder.conv1.weight` [enc_dim, 12, 3, 3, 3] and
        `decoder.conv1.weight` [4·dec_dim, 48, 3, 3, 3] (the decoder starts at its widest stage)."""
        for key in ("encoder.conv1.weight", "decoder.conv1.weight"):
            if key not in sd:
                raise CheckpointError(f"VAE state dict has no {key!r}; cannot infer the VAE widths")
        return int(sd["encoder.conv1.weight"].shape[0]), int(sd["decoder.conv1.weight"].shape[0]) // DIM_MULT[-1]

    # ------------------------------------------------------------------ helpers

    def part_weight(self, part: str) -> Tensor:
        """A weight of `part` ('encoder' | 'decoder'), whose dtype and device that part computes in;
        a LanceError when `load_vae` left the part unloaded."""
        module = getattr(self, part)
        if any(p.is_meta for p in module.parameters()):
            raise LanceError(f"the VAE {part} weights are not loaded (load_vae was called without {part!r} in parts)")
        return next(module.parameters())

    def normalize(self, mu: Tensor) -> Tensor:
        """Raw posterior mean [B, 48, t, h, w] -> normalised latent (fp32)."""
        mean, inv_std = _stats(mu.device)
        return (mu.float() - mean) * inv_std

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised latent [B, 48, t, h, w] -> raw latent (fp32)."""
        mean, inv_std = _stats(z.device)
        return z.float() / inv_std + mean

    # ------------------------------------------------------------------ streams

    def encode_frames(self, x: Tensor, cache: StreamCache, tick=None) -> tuple[Tensor, Tensor]:
        """Pixels [B, 3, T, H, W] (weights' dtype/device) -> raw (mu, log_var), each [B, 48, t, h, w].

        A fresh cache takes the first frame alone and then chunks of 4; a cache that has already
        seen chunks continues with chunks of 4 (T must then be a multiple of 4).
        """
        x = patchify(x)  # [B, 12, T, H/2, W/2]
        t = x.shape[2]
        bounds = [0, 1] if cache.chunks_done == 0 else [0]
        bounds += range(bounds[-1] + 4, t + 1, 4)
        if bounds[-1] != t:
            raise ValueError(f"cannot split {t} frames into VAE chunks (1 then 4 at a time)")
        outs = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            cache.start_chunk()
            outs.append(self.encoder(x[:, :, start:stop], cache))
            cache.end_chunk()
            if tick is not None:
                tick()
        mu, log_var = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)
        return mu, log_var

    def decode_frames(self, z: Tensor, cache: StreamCache, tick=None) -> Tensor:
        """Raw (denormalised) latent [B, 48, t, h, w] -> pixels [B, 3, T, 16h, 16w], unclamped.

        One latent frame per chunk; the first chunk of a fresh cache yields 1 pixel frame, every
        later one 4, so a stream can also be fed in several calls with the same cache.
        """
        x = self.conv2(z)
        outs = []
        for i in range(x.shape[2]):
            cache.start_chunk()
            outs.append(self.decoder(x[:, :, i : i + 1], cache, first_chunk=cache.chunks_done == 0))
            cache.end_chunk()
            if tick is not None:
                tick()
        return unpatchify(torch.cat(outs, dim=2))

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def encode(self, video: Tensor, tiling: TilingConfig | None = None) -> tuple[Tensor, Tensor]:
        """Video [3, T, H, W] in [-1, 1] (T = 4k+1, H and W multiples of 16) ->
        (latent [t, h, w, 48] normalised, log_var [48, t, h, w] raw), both fp32.

        `tiling` (default: auto, see `TilingConfig`) encodes in spatial tiles above a size threshold."""
        ref = self.part_weight("encoder")
        if video.dim() != 4 or video.shape[0] != 3:
            raise ValueError(f"VAE encode expects [3, T, H, W], got {list(video.shape)}")
        _, t, h, w = video.shape
        if (t - 1) % 4 or h % 16 or w % 16:
            raise ValueError(f"VAE encode needs T = 4k+1 and H, W multiples of 16, got T={t}, {h}x{w}")
        tiling = TilingConfig() if tiling is None else tiling
        tiled = tiling.active(h // 16, w // 16)
        total, unit = (len(plan_tiles(h // 16, w // 16, tiling)), "tile") if tiled else (1 + (t - 1) // 4, "chunk")
        with bar(total, "vae encode", unit=unit, enabled=None, delay=PROGRESS_DELAY_S) as b:
            tick = None if b is None else b.update
            if tiled:
                return tiled_encode(self, video, tiling, tick=tick)
            x = video.to(device=ref.device, dtype=ref.dtype).unsqueeze(0)  # [1, 3, T, H, W]
            mu, log_var = self.encode_frames(x, StreamCache(), tick=tick)
        latent = self.normalize(mu)[0].permute(1, 2, 3, 0).contiguous()  # [t, h, w, 48]
        return latent, log_var[0].float()

    @torch.no_grad()
    def decode(self, latent: Tensor, tiling: TilingConfig | None = None) -> Tensor:
        """Normalised latent [t, h, w, 48] -> video [3, 1+4(t-1), 16h, 16w] clamped to [-1, 1], fp32.

        `tiling` (default: auto, see `TilingConfig`) decodes in spatial tiles above a size threshold."""
        ref = self.part_weight("decoder")
        if latent.dim() != 4 or latent.shape[-1] != self.z_dim:
            raise ValueError(f"VAE decode expects [t, h, w, {self.z_dim}], got {list(latent.shape)}")
        tiling = TilingConfig() if tiling is None else tiling
        t, h, w, _ = latent.shape
        tiled = tiling.active(h, w)
        total, unit = (len(plan_tiles(h, w, tiling)), "tile") if tiled else (t, "frame")
        with bar(total, "vae decode", unit=unit, enabled=None, delay=PROGRESS_DELAY_S) as b:
            tick = None if b is None else b.update
            if tiled:
                return tiled_decode(self, latent, tiling, tick=tick)
            z = latent.to(ref.device).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 48, t, h, w]
            z = self.denormalize(z).to(ref.dtype)
            return self.decode_frames(z, StreamCache(), tick=tick)[0].float().clamp_(-1.0, 1.0)


# ---------------------------------------------------------------------- loading

_PART_PREFIXES = {"encoder": ("encoder.", "conv1."), "decoder": ("decoder.", "conv2.")}
_SHOW = 5  # offending keys named in an error message


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """torch.load with weights_only and mmap (falling back to a plain read for legacy files)."""
    if not path.is_file():
        raise CheckpointError(f"VAE checkpoint not found: {path}")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format cannot be mmapped
    except Exception as e:  # noqa: BLE001 - any failure here means "not a readable checkpoint"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a valid PyTorch checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return sd


def _infer_dims(sd: Mapping[str, Tensor]) -> tuple[int, int]:
    """Like `WanVAE.dims_from_state_dict`, but tolerant: an absent width gets the release default.

    A part that is requested but absent is reported by the key check that follows.
    """
    enc = sd.get("encoder.conv1.weight")
    dec = sd.get("decoder.conv1.weight")
    enc_dim = int(enc.shape[0]) if enc is not None and enc.dim() == 5 else 160
    dec_dim = int(dec.shape[0]) // DIM_MULT[-1] if dec is not None and dec.dim() == 5 else 256
    return enc_dim, dec_dim


def _check_keys(path: Path, sd: Mapping[str, Tensor], expected: Mapping[str, torch.Size], required: list[str]) -> None:
    """Raise CheckpointError for missing, unexpected or mis-shaped keys."""
    problems = []
    missing = [k for k in required if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {list(sd[k].shape)} != {list(expected[k])}"
        for k in required
        if k in sd and tuple(sd[k].shape) != tuple(expected[k])
    ]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            problems.append(f"{label}: {', '.join(keys[:_SHOW])}{more}")
    if problems:
        raise CheckpointError(f"{path} does not match the Wan2.2 VAE layout; " + "; ".join(problems))


def load_vae(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    parts: Sequence[str] = ("encoder", "decoder"),
) -> WanVAE:
    """Load `Wan2.2_VAE.pth` into a `WanVAE` on `device` in `dtype`, in eval mode without grads.

    The module is built on the meta device and each tensor is cast/moved and assigned on its own,
    so host RAM never holds a second full copy. Only the requested `parts` are materialised:
    "encoder" (encoder + conv1) and/or "decoder" (conv2 + decoder); the rest stays on meta.
    """
    path = Path(path)
    parts = tuple(parts)
    if not parts or any(p not in _PART_PREFIXES for p in parts):
        raise ValueError(f"parts must be a non-empty subset of {tuple(_PART_PREFIXES)}, got {parts}")
    sd = _read_state_dict(path)
    prefixes = tuple(p for part in parts for p in _PART_PREFIXES[part])

    def fill(model: WanVAE) -> None:
        expected = {k: v.shape for k, v in model.state_dict().items()}
        required = [k for k in expected if k.startswith(prefixes)]
        _check_keys(path, sd, expected, required)
        for key in required:
            owner, _, name = key.rpartition(".")
            tensor = sd[key].to(device=device, dtype=dtype)
            setattr(model.get_submodule(owner), name, nn.Parameter(tensor, requires_grad=False))

    return build_on_meta(lambda: WanVAE(*_infer_dims(sd)), fill).requires_grad_(False)
