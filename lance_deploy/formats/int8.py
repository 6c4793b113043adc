"""int8: symmetric per-output-channel int8 weights (W8A16, or W8A8 with dynamic activations).

Fields for a logical [out, in] weight:
    qdata  int8    [out, in]   round(w / scale), clamped to [-127, 127]
    scale  float32 [out, 1]    absmax(row) / 127
Dequantize: qdata.float() * scale.

The range is ±127, not -128..127, so the grid is symmetric and negating a weight negates its
code. W8A8 (spec.activations == "dynamic_per_token"): each input row x / smooth is quantized
the same way (`quantize_activations`), the int8 x int8 product accumulates exactly in int32
(`torch._int_mm` on CUDA, an int32 matmul on CPU), and the result is scaled by
x_scale [n, 1] * scale.T [1, out].
"""

from __future__ import annotations

import torch

from .base import FormatSpec, Layout, PackedTensor, check_shape, row_absmax, rowwise

QMAX = 127
_TINY = 1e-12


def layout(shape: tuple[int, int], spec: FormatSpec) -> Layout:
    out, inn = check_shape(shape, spec)
    return {"qdata": ((out, inn), torch.int8), "scale": ((out, 1), torch.float32)}


def params(w: torch.Tensor, spec: FormatSpec) -> tuple[torch.Tensor, None]:
    """Round-to-nearest scale for w [out, k]: absmax over the k columns / 127 -> [out, 1] fp32."""
    return (row_absmax(w) / QMAX).clamp_min(_TINY), None


def _codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # One fp32 copy, divided and rounded in place (never w itself, which may already be fp32).
    return w.to(torch.float32, copy=True).div_(scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: None, spec: FormatSpec) -> torch.Tensor:
    """Quantize and dequantize w [out, k] with a scale broadcastable to it; returns fp32."""
    return _codes(w, scale).float() * scale


def pack(w: torch.Tensor, scale: torch.Tensor, zero_point: None, spec: FormatSpec) -> PackedTensor:
    """Pack w [out, in] with given per-row scale [out, 1]."""
    check_shape(tuple(w.shape), spec)
    codes = rowwise(_codes, w, scale, torch.int8)  # row blocks: no whole-weight temporaries
    return PackedTensor(codes, scale.float().contiguous(), spec, tuple(w.shape))


def dequantize(p: PackedTensor) -> torch.Tensor:
    """Reference dequantizer: fp32 [out, in]."""
    return p.qdata.float() * p.scale.float()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8: x [..., in] -> (codes int8 [..., in], scale fp32 [..., 1])."""
    scale = (row_absmax(x, dim=-1) / QMAX).clamp_min(_TINY)
    return _codes(x, scale), scale


QLO = -128  # ONNX / TensorRT QuantizeLinear saturates int8 to [-128, 127]


def static_scale(amax: float) -> torch.Tensor:
    """The per-tensor activation scale of a calibrated amax: fp32 scalar amax / 127 (> 0)."""
    return torch.tensor(max(float(amax) / QMAX, _TINY), dtype=torch.float32)


def quantize_activations_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 codes of x with a calibrated `scale`, exactly as ONNX QuantizeLinear
    (round half to even, saturate to [-128, 127]): values past the calibrated amax clip."""
    return torch.round(x.float() / scale).clamp_(QLO, QMAX).to(torch.int8)
