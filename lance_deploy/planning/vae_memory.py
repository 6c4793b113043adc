"""Byte formulas of the Wan2.2 VAE streams (`model/vae.py`, `vae_blocks.py`, `vae_tiling.py`).

The VAE streams time: the decoder runs one latent frame per chunk (4 pixel frames after the
first), the encoder 1 then 4 pixel frames per chunk. Memory is therefore
  persistent causal caches (2 input frames of every 3x3x3 conv, at each stage's resolution)
+ the busiest moment of one chunk (a residual block at the top resolution: its input, the fp32
  norm, the conv's cache-concatenated and padded input, its output)
+ what accumulates (decoded chunks, then `torch.cat` + unpatchify + fp32 copy at the end).
Tiled decode replaces the frame by one tile (32 + overlap cells) but keeps an fp32 canvas of the
whole video. Walked op by op below; reference numbers, bf16, dec_dim 256 / enc_dim 160:

| case (latent grid)                      | caches  | chunk peak (incl. caches) | output / canvas | total   |
|-----------------------------------------|---------|---------------------------|-----------------|---------|
| decode 768² (1x48x48), untiled          | 1.03 GB | 1.63 GB                   | 7 MB            | 1.63 GB |
| decode 768², tiled 32 (auto: 48 > 36)   | 0.46 GB | 0.73 GB                   | 7 MB            | 0.74 GB |
| decode 480x848x121 (31x30x53), untiled  | 1.45 GB | 4.03 GB                   | 0.59 GB         | 4.05 GB |
| decode 480x848x121, tiled 32 (auto)     | 0.88 GB | 3.03 GB                   | 0.59 GB canvas  | 3.22 GB |
| encode 480x848x69, untiled              | 0.48 GB | 1.79 GB                   | 11 MB           | 1.80 GB |
| encode 480x848x69, tiled 32 (auto)      | 0.29 GB | 1.25 GB                   | 11 MB           | 1.26 GB |

The walk is checked against the allocations the profiler records on CPU with the convolutions
replaced by their outputs (cuDNN's workspace is not modelled; the planner's fragmentation
allowance covers some of it), within 10 %, in `tests/planning/test_planner.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

F32 = 4
DEC_MULT = (4, 4, 4, 2, 1)  # decoder widths / dec_dim: 1024, 1024, 1024, 512, 256
ENC_MULT = (1, 1, 2, 4, 4)  # encoder widths / enc_dim: 160, 160, 320, 640, 640
Z = 48


@dataclass
class Walk:
    """Running peak of one chunk. `cache` sums the causal tails the chunk leaves behind. On a
    stream's first chunk (`grow`) they accumulate as the chunk goes, so each moment counts the
    tails so far; on later chunks the previous chunk's full set is alive throughout and the caller
    adds it once (a conv's new tail, alive next to the old one until written, is in the moment)."""

    b: int
    grow: bool = False
    cache: int = 0
    peak: int = 0

    def moment(self, live: int) -> None:
        self.peak = max(self.peak, live + (self.cache if self.grow else 0))


def _conv(w: Walk, held: int, cin: int, cout: int, f: int, P: int, prev: int) -> int:
    """CausalConv3d 3x3x3 on [cin, f, P]: (silu input) + cache cat + padded copy + new tail + out.
    `held` is everything else alive; returns the new tail's bytes (the cache it leaves)."""
    b = w.b
    tail = min(prev + f, 2) * cin * P * b
    cat = (prev + f) * cin * P * b if prev else 0
    pad = (f + 2) * cin * P * b  # front time padding, or the 2 cached frames
    out = cout * f * P * b
    w.moment(held + f * cin * P * b + max(cat + pad + tail, pad + tail + out))
    return tail


def _norm(w: Walk, held: int, c: int, f: int, P: int) -> None:
    """ChannelRMSNorm: the input plus two fp32 tensors of it at a time."""
    w.moment(held + c * f * P * w.b + 2 * c * f * P * F32)


def _res(w: Walk, held: int, cin: int, cout: int, f: int, P: int, prev: int) -> None:
    """ResidualBlock: norm-silu-conv twice, shortcut 1x1x1 conv when the width changes."""
    b, x = w.b, cin * f * P * w.b
    y = cout * f * P * b
    _norm(w, held, cin, f, P)
    w.cache += _conv(w, held + x, cin, cout, f, P, prev)
    _norm(w, held + x, cout, f, P)
    w.cache += _conv(w, held + x + y, cout, cout, f, P, prev)
    w.moment(held + x + 3 * y)  # y2 + shortcut(x) + their sum


def _attention(w: Walk, held: int, c: int, f: int, P: int) -> None:
    """Single-head per-frame attention at the bottleneck: qkv, its transpose, q/k/v copies,
    output; scores counted as if materialised (head_dim = C is above flash's limit)."""
    w.moment(held + c * f * P * w.b * 10 + 2 * f * P * P * F32)


def decoder_chunk(w: Walk, dec_dim: int, P0: int, first: bool, held: int) -> int:
    """One latent frame through the decoder; returns the pixel-chunk bytes it emits."""
    b, prev = w.b, 0 if first else 2
    dims = [dec_dim * m for m in DEC_MULT]
    f, P = 1, P0
    w.cache += _conv(w, held, Z, dims[0], f, P, prev)
    _res(w, held, dims[0], dims[0], f, P, prev)
    _attention(w, held, dims[0], f, P)
    _res(w, held, dims[0], dims[0], f, P, prev)
    for i, temporal in enumerate((True, True, False, False)):
        cin, cout, spatial = dims[i], dims[i + 1], i < 3
        x_stage = cin * f * P * b
        for k in range(3):
            _res(w, held + (x_stage if k else 0), cin if k == 0 else cout, cout, f, P, prev)
        if not spatial:
            continue
        f2 = f if (first or not temporal) else 2 * f
        if temporal and not first:  # time_conv to 2C channels, then frame-pair interleave copy
            w.cache += _conv(w, held + x_stage, cout, 2 * cout, f, P, prev)
            w.moment(held + x_stage + 2 * cout * f * P * b * 2)
        up = cout * f2 * 4 * P * b
        w.moment(held + x_stage + 2 * cout * f2 * P * b + 2 * up)  # copy, nearest x2, conv2d
        # y, the repeat_interleave shortcut and its permuted copy (2x larger on the first chunk of a
        # temporal stage, which then drops a frame), then the sum
        w.moment(held + x_stage + (5 if first and temporal else 4) * up)
        f, P = f2, 4 * P
    _norm(w, held, dims[-1], f, P)
    w.cache += _conv(w, held, dims[-1], 12, f, P, prev)
    return 12 * f * P * b


def _stream(dec_dim: int, t: int, P0: int, b: int) -> tuple[int, int, int]:
    """(caches, peak, output bytes) of one decode stream of t latent frames over P0 cells."""
    first = Walk(b, grow=True)
    out1 = decoder_chunk(first, dec_dim, P0, True, 0)
    if t == 1:
        return first.cache, first.peak, out1
    steady = Walk(b)
    out4 = decoder_chunk(steady, dec_dim, P0, False, 0)
    outs = out1 + (t - 2) * out4  # decoded chunks accumulated before the last one
    return steady.cache, steady.cache + steady.peak + outs, out1 + (t - 1) * out4


@dataclass(frozen=True)
class VAEBytes:
    caches: int
    chunk_peak: int  # caches + busiest chunk moment + accumulated chunks
    output: int  # fp32 result (or canvas)
    total: int


def vae_decode_bytes(dec_dim: int, grid: tuple[int, int, int], b: int, tile: int | None = None,
                     overlap: int = 8) -> VAEBytes:
    """Peak of `WanVAE.decode` for a latent grid (t, h, w); `tile` = tiled decode's tile side."""
    t, h, w = grid
    pixels = 3 * (1 + 4 * (t - 1)) * 256 * h * w  # output elements
    z = t * h * w * Z * (F32 + b)  # the denormalised latent (fp32, then at the compute dtype)
    if tile is None:
        caches, peak, out = _stream(dec_dim, t, h * w, b)
        end = max(3 * out, out + pixels * F32)  # chunks + cat + unpatchify, then the fp32 copy
        return VAEBytes(caches, peak, pixels * F32, z + max(peak, end))
    th, tw = min(h, tile), min(w, tile)
    caches, peak, out = _stream(dec_dim, t, th * tw, b)
    tile_px = 3 * (1 + 4 * (t - 1)) * 256 * th * tw
    canvas = pixels * F32
    end = max(3 * out, out + 2 * tile_px * F32)  # tile result, its fp32 weighted copy
    # (+ one tile result of slack: measured ~5 % above the walk on CPU with GPU-like convs)
    return VAEBytes(caches, canvas + peak, canvas, z + canvas + max(peak, end) + out)


def vae_encode_bytes(enc_dim: int, frames: int, height: int, width: int, b: int,
                     tile: int | None = None) -> VAEBytes:
    """Peak of `WanVAE.encode` for [3, frames, H, W] pixels (chunks of 1, then 4 frames)."""
    video = 3 * frames * height * width * b
    th, tw = (height, width) if tile is None else (min(height, 16 * tile), min(width, 16 * tile))
    # the input stays referenced; patchify copies it (a tile view needs a second, transient copy)
    held = video + 3 * frames * th * tw * b * (1 if tile is None else 2)
    first = Walk(b, grow=True)
    _encoder_chunk(first, enc_dim, 1, th * tw // 4, True, held)
    caches, peak = first.cache, first.peak
    if frames > 1:
        steady = Walk(b)
        _encoder_chunk(steady, enc_dim, 4, th * tw // 4, False, held)
        caches, peak = steady.cache, max(peak, steady.cache + steady.peak)
    latent = 2 * Z * ((frames - 1) // 4 + 1) * (height // 16) * (width // 16) * F32  # mu, log_var (canvases)
    return VAEBytes(caches, peak, latent, peak + latent)


def _encoder_chunk(w: Walk, enc_dim: int, f: int, P: int, first: bool, held: int) -> None:
    """One pixel chunk (f frames over P = H/2 x W/2 positions, 12 channels) through the encoder."""
    b, prev = w.b, 0 if first else 2
    dims = [enc_dim * m for m in ENC_MULT]
    w.cache += _conv(w, held, 12, dims[0], f, P, prev)
    for i, (temporal, spatial) in enumerate(((False, True), (True, True), (True, True), (False, False))):
        cin, cout = dims[i], dims[i + 1]
        x_stage = cin * f * P * b
        for k in range(2):
            _res(w, held + (x_stage if k else 0), cin if k == 0 else cout, cout, f, P, prev)
        y = cout * f * P * b
        f2, P2 = (f // 2 if temporal and not first else f), (P // 4 if spatial else P)
        if spatial:  # per-frame copy, zero-padded copy, stride-2 conv
            w.moment(held + x_stage + 3 * y + cout * f * P2 * b)
        if temporal:  # cache 1 frame; later chunks: cat(prev, x) -> tail, padded copy, stride-2 time conv
            w.cache += cout * P2 * b
            if not first:
                w.moment(held + x_stage + cout * P2 * b * (f + (1 + f) * 2 + 2 + f2))
        w.moment(held + x_stage + cout * f * P2 * b + 2 * x_stage + cout * f2 * P2 * b)  # avg_down shortcut
        f, P = f2, P2
    _res(w, held, dims[-1], dims[-1], f, P, prev)
    _attention(w, held, dims[-1], f, P)
    _res(w, held, dims[-1], dims[-1], f, P, prev)
    _norm(w, held, dims[-1], f, P)
    w.cache += _conv(w, held, dims[-1], 2 * Z, f, P, prev)
