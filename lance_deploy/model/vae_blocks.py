"""Building blocks of the Wan2.2 48-channel video VAE (causal 3-D convs with streaming caches).

Every temporal operation here is *streamed*: the VAE runs over a video one chunk of frames at a
time, and each causal op keeps the last frames it saw in a `StreamCache` slot so that the next
chunk continues where the previous one stopped. Slots are addressed in visiting order, which is
fixed by the network structure, so one cache object fully describes one stream. Two streams (two
spatial tiles, say) simply use two caches.

Attribute names and nesting mirror the release state dict (`residual.2`, `resample.1`,
`time_conv`, `norm.gamma`, ...) so that the `.pth` keys load without renaming.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CACHE_T = 2  # frames of history a 3-tap causal conv needs

# Marks an upsample slot whose first chunk went through without temporal doubling.
_FIRST_CHUNK_DONE = object()


class StreamCache:
    """Causal state of one encode or decode stream.

    Each causal op calls `read()` then `write()` exactly once per chunk; `start_chunk()` rewinds the
    slot cursor and `end_chunk()` counts finished chunks (`chunks_done == 0` means "first chunk").
    """

    def __init__(self) -> None:
        self._slots: list[Any] = []
        self._cursor = 0
        self.chunks_done = 0

    def start_chunk(self) -> None:
        self._cursor = 0

    def end_chunk(self) -> None:
        self.chunks_done += 1

    def read(self) -> Any:
        if self._cursor == len(self._slots):
            self._slots.append(None)
        return self._slots[self._cursor]

    def write(self, value: Any) -> None:
        self._slots[self._cursor] = value
        self._cursor += 1


def patchify(x: Tensor) -> Tensor:
    """[B, C, T, 2h, 2w] -> [B, 4C, T, h, w]; channel = c·4 + (w offset)·2 + (h offset)."""
    b, c, t, hh, ww = x.shape
    x = x.reshape(b, c, t, hh // 2, 2, ww // 2, 2)  # [B, C, T, h, q, w, r]
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * 4, t, hh // 2, ww // 2)


def unpatchify(x: Tensor) -> Tensor:
    """Inverse of `patchify`: [B, 4C, T, h, w] -> [B, C, T, 2h, 2w]."""
    b, c4, t, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, t, h, w)  # [B, C, r, q, T, h, w]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // 4, t, h * 2, w * 2)


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the front only (2·p_t frames), so frame i never sees frame i+1.

    With a cache, the front padding is (partly) replaced by the last input frames of the previous
    chunk, which makes chunked evaluation equal to evaluating the whole sequence at once.
    """

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        kernel, self.stride, (pt, ph, pw) = _triple(kernel), _triple(stride), _triple(padding)
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def step(self, x: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        """One chunk [B, C, T, H, W] with the previous tail -> (output, tail for the next chunk)."""
        if prev is not None:
            x = torch.cat([prev, x], dim=2)
        # The tail is taken before padding: the last CACHE_T real frames seen so far.
        tail = x[:, :, -CACHE_T:].clone()
        front = self.time_pad - (0 if prev is None else prev.shape[2])
        x = F.pad(x, (*self.space_pad, front, 0))
        return F.conv3d(x, self.weight, self.bias, self.stride), tail

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        if cache is None or self.time_pad == 0:
            return self.step(x, None)[0]
        out, tail = self.step(x, cache.read())
        cache.write(tail)
        return out


class ChannelRMSNorm(nn.Module):
    """`F.normalize` over channels · √C · γ (no eps-in-mean RMS, no bias).

    Normalised in fp32, as upstream's bf16 autocast does for `normalize`, then cast back.
    """

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: Tensor) -> Tensor:
        y = F.normalize(x.float(), dim=1) * self.scale * self.gamma.float()
        return y.to(x.dtype)


def per_frame(fn, x: Tensor) -> Tensor:
    """Apply a 2-D op to every frame: [B, C, T, H, W] -> fn([B·T, C, H, W]) -> [B, C', T, H', W']."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))  # [B·T, C', H', W']
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv3 ×2 plus a 1×1×1 shortcut conv when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        # Indices 1, 4, 5 (SiLU, SiLU, Dropout) hold no weights; they keep the release key numbering.
        self.residual = nn.Sequential(
            ChannelRMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            ChannelRMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1),
        )
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cache: StreamCache) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        y = conv1(F.silu(norm1(x)), cache)
        y = conv2(F.silu(norm2(y)), cache)
        return y + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame (frames do not mix)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w)  # [N, 1 head, 3C, HW]
        q, k, v = qkv.transpose(2, 3).contiguous().chunk(3, dim=-1)  # each [N, 1, HW, C]
        o = F.scaled_dot_product_attention(q, k, v)  # [N, 1, HW, C]
        return self.proj(o.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        return x + per_frame(self._attend, x)


class Downsample(nn.Module):
    """Spatial stride-2 conv (pad right/bottom by one), optionally followed by a temporal ÷2."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.temporal = temporal

    def forward(self, x: Tensor, cache: StreamCache) -> Tensor:
        x = per_frame(self.resample, x)
        if not self.temporal:
            return x
        prev = cache.read()
        cache.write(x[:, :, -1:].clone())
        if prev is None:
            # The first chunk (the lone first frame) keeps its length: latent frame 0 = pixel frame 0.
            return x
        # One frame of history + 2k new frames -> k frames (3 taps, stride 2, no padding).
        return self.time_conv(torch.cat([prev, x], dim=2))


class Upsample(nn.Module):
    """Optional temporal ×2 (conv to 2C channels, interleaved as frame pairs), then spatial ×2 + conv."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim, 3, padding=1)
        )
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        self.temporal = temporal

    def _double_time(self, x: Tensor, cache: StreamCache) -> Tensor:
        prev = cache.read()
        if prev is None:
            # First chunk: one latent frame decodes to one pixel frame, so no doubling here. The
            # time conv history then starts *after* this frame (zeros in front of chunk 2).
            cache.write(_FIRST_CHUNK_DONE)
            return x
        y, tail = self.time_conv.step(x, None if prev is _FIRST_CHUNK_DONE else prev)
        cache.write(tail)
        b, c2, t, h, w = y.shape
        # Channels [0:C] are the earlier frame of each pair, [C:2C] the later one.
        y = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [B, C, T, 2, H, W]
        return y.reshape(b, c2 // 2, 2 * t, h, w)

    def forward(self, x: Tensor, cache: StreamCache) -> Tensor:
        if self.temporal:
            x = self._double_time(x, cache)
        # nearest-exact is a pure copy, so no fp32 round trip is needed for bf16.
        return per_frame(self.resample, x)


def avg_down(x: Tensor, cout: int, ft: int, fs: int) -> Tensor:
    """Parameter-free shortcut of a down stage: space/time-to-channel, then mean over channel groups.

    Time is zero-padded on the front to a multiple of `ft` (the lone first frame gets a zero partner).
    """
    x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, ft, fs, fs, T/ft, H/fs, W/fs]
    group = c * ft * fs * fs // cout
    x = x.reshape(b, cout, group, t // ft, h // fs, w // fs)
    return x.mean(dim=2)


def dup_up(x: Tensor, cout: int, ft: int, fs: int, first_chunk: bool) -> Tensor:
    """Parameter-free shortcut of an up stage: repeat channels, then channel-to-space/time.

    On the first chunk the first ft-1 frames are dropped, matching the main path's single frame.
    """
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(cout * ft * fs * fs // c, dim=1)
    x = x.reshape(b, cout, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, C, T, ft, H, fs, W, fs]
    x = x.reshape(b, cout, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1 :] if first_chunk else x


class DownStage(nn.Module):
    """Encoder stage: residual blocks, optional down-sampling, plus the averaging shortcut."""

    def __init__(self, cin: int, cout: int, num_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        blocks: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)]
        if spatial:
            blocks.append(Downsample(cout, temporal))
        self.downsamples = nn.Sequential(*blocks)
        self.cout, self.ft, self.fs = cout, 2 if temporal else 1, 2 if spatial else 1

    def forward(self, x: Tensor, cache: StreamCache) -> Tensor:
        y = x
        for block in self.downsamples:
            y = block(y, cache)
        return y + avg_down(x, self.cout, self.ft, self.fs)


class UpStage(nn.Module):
    """Decoder stage: residual blocks, optional up-sampling; the duplicating shortcut only when up-sampling."""

    def __init__(self, cin: int, cout: int, num_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        blocks: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)]
        if spatial:
            blocks.append(Upsample(cout, temporal))
        self.upsamples = nn.Sequential(*blocks)
        self.spatial = spatial
        self.cout, self.ft = cout, 2 if temporal else 1

    def forward(self, x: Tensor, cache: StreamCache, first_chunk: bool) -> Tensor:
        y = x
        for block in self.upsamples:
            y = block(y, cache)
        if not self.spatial:
            return y
        return y + dup_up(x, self.cout, self.ft, 2, first_chunk)
