"""int4: group-wise 4-bit integers, two per byte; asymmetric by default.

Fields for a logical [out, in] weight with group size g (spec.group_size, dividing in):
    qdata       uint8   [out, in/2]   codes 0..15; low nibble = even column, high nibble = odd
    scale       float32 [out, in/g]   one per (row, group)
    zero_point  uint8   [out, in/g]   0..15 (asymmetric only; absent when symmetric)
Dequantize: (code - zero_point) * scale, broadcast over each group's g columns.

Asymmetric scales span [min(w, 0), max(w, 0)] of the group in 15 steps, so zero is exactly
representable (the GPTQ convention). Symmetric: scale = absmax / 7 with an implicit zero point
of 8, so codes 1..15 are used and the grid is symmetric. bf16 scales are accepted on load
(dequantize casts to fp32); packing always writes fp32.
"""

from __future__ import annotations

import torch

from .base import FormatSpec, Layout, PackedTensor, check_shape, expand_groups

QMAX = 15
SYM_ZERO = 8
_TINY = 1e-12


def layout(shape: tuple[int, int], spec: FormatSpec) -> Layout:
    out, inn = check_shape(shape, spec)
    groups = inn // spec.group_size
    table: Layout = {"qdata": ((out, inn // 2), torch.uint8), "scale": ((out, groups), torch.float32)}
    if not spec.symmetric:
        table["zero_point"] = ((out, groups), torch.uint8)
    return table


def params(w: torch.Tensor, spec: FormatSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest group params for w [out, k] (k a multiple of g) -> [out, k/g] each."""
    g = spec.group_size
    wg = w.float().reshape(w.shape[0], -1, g)  # [out, k/g, g]
    if spec.symmetric:
        return (wg.abs().amax(dim=2) / 7).clamp_min(_TINY), None
    lo = wg.amin(dim=2).clamp(max=0)
    hi = wg.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / QMAX).clamp_min(_TINY)
    zero = torch.round(-lo / scale).clamp_(0, QMAX)
    return scale, zero.to(torch.uint8)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    z = SYM_ZERO if zero is None else zero.float()
    return (torch.round(w.float() / scale) + z).clamp_(0, QMAX).to(torch.uint8)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: FormatSpec) -> torch.Tensor:
    """Quantize and dequantize w [out, k]; scale/zero_point already broadcastable to w."""
    z = SYM_ZERO if zero_point is None else zero_point.float()
    return (_codes(w, scale, zero_point).float() - z) * scale


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] (0..15, in even) -> uint8 [out, in/2], low nibble = even column."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [out, in/2] -> uint8 [out, in]."""
    pairs = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # [out, in/2, 2]
    return pairs.reshape(packed.shape[0], -1)


def pack(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: FormatSpec) -> PackedTensor:
    """Pack w [out, in] with group params scale/zero_point [out, in/g]."""
    check_shape(tuple(w.shape), spec)
    g = spec.group_size
    zb = None if zero_point is None else expand_groups(zero_point, g)
    codes = _codes(w, expand_groups(scale.float(), g), zb)
    zp = None if spec.symmetric else zero_point.to(torch.uint8).contiguous()
    return PackedTensor(pack_nibbles(codes), scale.float().contiguous(), spec, tuple(w.shape), zero_point=zp)


def dequantize(p: PackedTensor) -> torch.Tensor:
    """Reference dequantizer: fp32 [out, in]."""
    g = p.spec.group_size
    codes = unpack_nibbles(p.qdata).float()
    zero = SYM_ZERO if p.zero_point is None else expand_groups(p.zero_point.float(), g)
    return (codes - zero) * expand_groups(p.scale.float(), g)
