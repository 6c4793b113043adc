"""Lance's input preprocessing: frame sampling and the VAE / ViT bucket transforms.

This reproduces what upstream's `ValidationDataset` does to an input image or
video (bytedance/Lance `data/datasets_custom/validation_dataset.py`, its
`VideoTransform` built from `NaResize(mode="bucket")` + `DivisibleCrop` +
`Normalize`, and the `multi_clips` frame sampler), using only numpy, Pillow and
torch (there is no CPU torchvision wheel for our torch).

The exact semantics (all reproduced bit for bit, see the tests):

* Images *and* video frames go through **Pillow**: upstream hands the bucket
  resizer a list of PIL images (decord frames are turned into PIL images by
  `Image.fromarray`), so the resize is PIL's uint8 BICUBIC (which always
  antialiases), never torchvision's tensor interpolation.
* Bucket choice: six aspect ratios, each turned into an (h, w) bucket of area
  about side^2 with both sides multiples of `stride` (16, also for the ViT);
  the bucket whose *realised* ratio w/h is nearest to the image's w/h wins
  (first one on ties).
* `RandomResizedCrop(scale=(1, 1), ratio=(r, r))`: one attempt with the whole
  area at ratio r (it succeeds only if the rounded crop fits inside the image),
  else torchvision's fallback: the largest centred crop of ratio r, sides
  `int(round(...))`, offsets `(size - crop) // 2`. Then PIL BICUBIC to the bucket.
* `to_tensor` (uint8 / 255 in float32), then a centre crop of each side down to
  a multiple of 16 (VAE) or 28 (ViT) with torchvision's `center_crop` offsets
  `int(round(diff / 2))` (Python round: half to even), then
  `(x - mean) / std` in float32.
* ViT only: an image is repeated to T = 2 and an odd T gets its last frame
  repeated, because the ViT patches 2 frames at a time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lance_deploy.core.errors import MediaError

# Upstream's bucket aspect ratios, in upstream order (the order decides ties).
ASPECT_RATIOS: tuple[str, ...] = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")

# The VAE sees pixels in [-1, 1]; the ViT sees CLIP-normalised pixels.
VAE_MEAN: tuple[float, ...] = (0.5,)
VAE_STD: tuple[float, ...] = (0.5,)
CLIP_MEAN: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

# Side multiples after the bucket resize: VAE downsamples by 16, the ViT needs
# whole 2x2 merge units of 14-pixel patches.
VAE_CROP = 16
VIT_CROP = 28
BUCKET_STRIDE = 16


@dataclass(frozen=True)
class Preset:
    """A resolution preset: the bucket area sides of the VAE and ViT transforms."""

    name: str
    vae_side: int
    vit_side: int


# Upstream `ValidationDataset.__init__` (data_config.resolution -> resolution_vae / _vit).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("video_192p", 256, 224),
        Preset("image_256res", 256, 224),
        Preset("image_512res", 512, 448),
        Preset("image_768res", 768, 672),
        Preset("video_360p", 480, 476),
        Preset("video_480p", 640, 616),
    )
}


# --------------------------------------------------------------------------- frame sampler


# The frame rate video inputs are resampled to, so also the rate of every video the model makes.
TARGET_FPS = 12


def sample_frame_indices(
    num_frames: int, fps: float, target_fps: int = TARGET_FPS, max_seconds: float = 6.0
) -> list[int]:
    """Indices of the frames upstream keeps from an `num_frames`-frame video at `fps`.

    Upstream's `multi_clips` sampler with one clip covering the whole video:
    resample to `target_fps`, keep at most `max_seconds`, and make the count
    4k+1 (the VAE's temporal stride is 4; a count that already is a multiple
    of 4 drops to the previous 4k+1). Frames are spread evenly over the
    *whole* video (`np.linspace(..., dtype=int)` truncates), so a clip longer
    than `max_seconds` is sped up, not cut.
    """
    if num_frames < 1:
        raise MediaError("the video has no frames")
    # Upstream rounds the container fps to an integer before anything else.
    int_fps = int(round(float(fps)))
    if int_fps < 1:
        raise MediaError(f"the video frame rate {fps} fps is too low (it rounds to 0)")
    duration = min(num_frames / int_fps, max_seconds)
    n = int(round(duration * target_fps))
    n = n // 4 * 4 + 1 if n % 4 else n // 4 * 4 + 1 - 4
    # Deviation: upstream crashes (np.linspace with a negative count) when the
    # clip is shorter than ~1.5 sampled frames; keep the first frame instead.
    n = max(n, 1)
    return np.linspace(0, num_frames - 1, n, dtype=int).tolist()


# --------------------------------------------------------------------------- buckets


def _snap(value: float, stride: int) -> int:
    """Nearest multiple of `stride` (Python round: half to even, as upstream)."""
    return round(value / stride) * stride


def _bucket_for_ratio(ratio_name: str, area: int, stride: int) -> tuple[int, int]:
    """The (h, w) bucket upstream derives for one aspect ratio name like "16:9".

    Two candidates: snap the width first, or the height first; keep the one
    whose realised ratio is closer to the nominal one, and on a tie the one
    whose area is closer to `area` (width-first wins a second tie).
    """
    rw, rh = (int(v) for v in ratio_name.split(":"))
    nominal = rw / rh
    w1 = _snap(math.sqrt(area * nominal), stride)
    h1 = _snap(w1 / nominal, stride)
    h2 = _snap(math.sqrt(area / nominal), stride)
    w2 = _snap(h2 * nominal, stride)
    d1, d2 = abs(w1 / h1 - nominal), abs(w2 / h2 - nominal)
    if d1 < d2 or (d1 == d2 and abs(w1 * h1 - area) <= abs(w2 * h2 - area)):
        return h1, w1
    return h2, w2


@functools.lru_cache(maxsize=64)
def _buckets(area_side: int, stride: int) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
    """All buckets (h, w) for an area side, and their realised ratios w / h."""
    area = area_side * area_side
    buckets = tuple(_bucket_for_ratio(name, area, stride) for name in ASPECT_RATIOS)
    ratios = np.array([w / h for h, w in buckets], dtype=np.float64)
    ratios.flags.writeable = False
    return buckets, ratios


def _nearest_bucket(h: int, w: int, area_side: int, stride: int) -> tuple[tuple[int, int], float]:
    """The bucket nearest to the image's ratio w/h, and the bucket's ratio."""
    if h < 1 or w < 1:
        raise MediaError(f"cannot preprocess an empty {h}x{w} frame")
    buckets, ratios = _buckets(area_side, stride)
    index = int(np.abs(w / h - ratios).argmin())  # first bucket on ties, as upstream
    return buckets[index], float(ratios[index])


def bucket_sizes(area_side: int, stride: int = BUCKET_STRIDE) -> tuple[tuple[int, int], ...]:
    """Every (H, W) bucket of an area side, one per aspect ratio (before the /16 or /28 crop)."""
    return _buckets(area_side, stride)[0]


def bucket_size(h: int, w: int, area_side: int, stride: int = BUCKET_STRIDE) -> tuple[int, int]:
    """The (H, W) bucket an h x w frame is resized to (before the /16 or /28 crop)."""
    return _nearest_bucket(h, w, area_side, stride)[0]


# --------------------------------------------------------------------------- crop + resize


def _crop_box(h: int, w: int, ratio: float) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of torchvision `RandomResizedCrop(scale=(1,1), ratio=(r,r))`.

    torchvision first tries a crop of the full area at ratio r. It draws the
    ratio as `exp(uniform(log r, log r))` in float32, hence the float32 round
    trip of log r here. The crop fits only when the image ratio is within
    rounding of r; the offset is then random in torchvision, but the slack is
    at most a pixel or so and we take the centre, matching the fallback. Any
    other image takes the fallback: the largest centred crop of ratio r.
    """
    area = float(h * w)
    drawn_ratio = math.exp(float(np.float32(math.log(ratio))))
    cw = int(round(math.sqrt(area * drawn_ratio)))
    ch = int(round(math.sqrt(area / drawn_ratio)))
    if not (0 < cw <= w and 0 < ch <= h):
        in_ratio = w / h
        if in_ratio < ratio:
            cw, ch = w, int(round(w / ratio))
        elif in_ratio > ratio:
            ch, cw = h, int(round(h * ratio))
        else:
            ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _bucket_resize(frames: np.ndarray, area_side: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, bh, bw] in [0, 1], via PIL BICUBIC."""
    n, h, w, _ = frames.shape
    (bh, bw), ratio = _nearest_bucket(h, w, area_side, BUCKET_STRIDE)
    top, left, ch, cw = _crop_box(h, w, ratio)
    out = np.empty((n, bh, bw, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(frames[i]).crop((left, top, left + cw, top + ch))
        out[i] = np.asarray(img.resize((bw, bh), Image.Resampling.BICUBIC))
    # torchvision to_tensor: a true division by 255 in float32.
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float32).div(255)


def _center_crop_divisible(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Centre-crop the last two dims down to multiples of `factor` (torchvision offsets)."""
    h, w = x.shape[-2:]
    ch, cw = h - h % factor, w - w % factor
    if ch == 0 or cw == 0:
        raise MediaError(f"the frame is too small: {h}x{w} after resizing, need at least {factor}x{factor}")
    # torchvision center_crop: int(round(diff / 2.0)), Python round (half to even).
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top : top + ch, left : left + cw]


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel of [N, 3, H, W], in float32 like torchvision."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


def _as_frames(frames: np.ndarray, is_video: bool) -> np.ndarray:
    """Validate uint8 frames and return them as [N, H, W, 3] (an [H, W, 3] image gets N=1)."""
    frames = np.asarray(frames)
    if frames.ndim == 3 and not is_video:
        frames = frames[None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise MediaError(
            f"expected uint8 RGB frames [N, H, W, 3], got {frames.dtype} {list(frames.shape)}"
        )
    if not is_video and frames.shape[0] != 1:
        raise MediaError(f"an image has exactly one frame, got {frames.shape[0]}")
    return np.ascontiguousarray(frames)


def _transform(frames: np.ndarray, area_side: int, crop: int, mean, std) -> torch.Tensor:
    """Upstream `VideoTransform`: bucket resize, divisible crop, normalise, -> [3, N, H, W]."""
    x = _bucket_resize(frames, area_side)
    x = _center_crop_divisible(x, crop)
    x = _normalize(x, mean, std)
    return x.permute(1, 0, 2, 3).contiguous()


# --------------------------------------------------------------------------- public transforms


def vae_pixels(frames: np.ndarray, area_side: int, is_video: bool) -> torch.Tensor:
    """VAE input: uint8 [N, H, W, 3] -> float32 [3, N, H', W'] in [-1, 1], H', W' multiples of 16.

    N is kept as is: for a video the caller samples it to 4k+1 first
    (`sample_frame_indices`); an image gives N = 1.
    """
    return _transform(_as_frames(frames, is_video), area_side, VAE_CROP, VAE_MEAN, VAE_STD)


def vit_pixels(frames: np.ndarray, area_side: int, is_video: bool) -> torch.Tensor:
    """ViT input: uint8 [N, H, W, 3] -> float32 [3, T, H'', W''], CLIP-normalised, sides multiples of 28.

    T is even: an image is repeated to 2 frames, a video with an odd frame count
    gets its last frame repeated (the ViT's temporal patch is 2 frames).
    """
    x = _transform(_as_frames(frames, is_video), area_side, VIT_CROP, CLIP_MEAN, CLIP_STD)
    if not is_video:
        x = x.repeat(1, 2, 1, 1)
    if x.shape[1] % 2:
        x = torch.cat([x, x[:, -1:]], dim=1)
    return x
