"""nf4: 4-bit NormalFloat with per-block absmax, in the bitsandbytes layout.

The codebook and packing are bitsandbytes' (`quantize_4bit(..., quant_type="nf4",
blocksize=64)` without double quantization), reimplemented here in pure torch so an artifact
loads and dequantizes without bitsandbytes; when it is installed the runtime hands the same
bytes to its kernels (`qlinear.py`), and the tests check our packing is bit-identical to it.

Fields for a logical [out, in] weight (in a multiple of 64, so a block never crosses a row):
    qdata  uint8   [out, in/2]    codebook indices 0..15; HIGH nibble = even column (bnb order,
                                  the opposite of int4), row-major, i.e. bnb's flat buffer
    scale  float32 [out, in/64]   absmax of each 64-element block (bnb's `absmax`)
Dequantize: NF4_CODE[index] * absmax.
"""

from __future__ import annotations

import torch

from .base import FormatSpec, Layout, PackedTensor, check_shape, expand_groups

# Quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, Dettmers et al. 2023);
# the exact float32 values bitsandbytes ships.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def code_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as fp32 [16]."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def layout(shape: tuple[int, int], spec: FormatSpec) -> Layout:
    out, inn = check_shape(shape, spec)
    return {"qdata": ((out, inn // 2), torch.uint8), "scale": ((out, inn // spec.group_size), torch.float32)}


def params(w: torch.Tensor, spec: FormatSpec) -> tuple[torch.Tensor, None]:
    """Block absmax for w [out, k] (k a multiple of 64) -> [out, k/64] fp32."""
    wg = w.float().reshape(w.shape[0], -1, spec.group_size)  # [out, k/64, 64]
    return wg.abs().amax(dim=2), None


def _codes(w: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as bitsandbytes' reference kernel: multiply by the reciprocal, clamp to
    # [-1, 1], then bucketize against fp32 midpoints (a tie goes to the lower code).
    code = code_table(w.device)
    scaled = (w.float() * (1.0 / absmax.clamp(min=1e-38))).clamp_(-1, 1)
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: None, spec: FormatSpec) -> torch.Tensor:
    """Quantize and dequantize w [out, k] with absmax broadcastable to it; returns fp32."""
    return code_table(w.device)[_codes(w, scale).long()] * scale


def pack(w: torch.Tensor, scale: torch.Tensor, zero_point: None, spec: FormatSpec) -> PackedTensor:
    """Pack w [out, in] with given block absmax [out, in/64]."""
    check_shape(tuple(w.shape), spec)
    codes = _codes(w, expand_groups(scale.float(), spec.group_size))
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return PackedTensor(packed, scale.float().contiguous(), spec, tuple(w.shape))


def dequantize(p: PackedTensor) -> torch.Tensor:
    """Reference dequantizer: fp32 [out, in]."""
    q = p.qdata
    idx = torch.stack([q >> 4, q & 0xF], dim=-1).reshape(q.shape[0], -1)  # [out, in]
    return code_table(q.device)[idx.long()] * expand_groups(p.scale.float(), p.spec.group_size)
