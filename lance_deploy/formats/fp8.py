"""fp8_e4m3: per-output-channel scaled float8 weights (W8A16, or W8A8 with dynamic activations).

Fields for a logical [out, in] weight:
    qdata  float8_e4m3fn [out, in]   w / scale, saturated to ±448
    scale  float32       [out, 1]    absmax(row) / 448
Dequantize: qdata.float() * scale.

With spec.activations == "dynamic_per_token" the runtime also quantizes each input row to
float8_e4m3fn with scale absmax(row) / 448 (see `quantize_activations`) and uses
`torch._scaled_mm` where the GPU has fp8 tensor cores (SM >= 8.9).
"""

from __future__ import annotations

import torch

from .base import FormatSpec, Layout, PackedTensor, check_shape, row_absmax, rowwise

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12  # scale floor: an all-zero row keeps a finite scale and packs to zeros


def layout(shape: tuple[int, int], spec: FormatSpec) -> Layout:
    out, inn = check_shape(shape, spec)
    return {"qdata": ((out, inn), torch.float8_e4m3fn), "scale": ((out, 1), torch.float32)}


def params(w: torch.Tensor, spec: FormatSpec) -> tuple[torch.Tensor, None]:
    """Round-to-nearest scale for w [out, k]: absmax over the k columns / 448 -> [out, 1] fp32."""
    return (row_absmax(w) / FP8_MAX).clamp_min(_TINY), None


def _codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Divide (not multiply by a reciprocal) everywhere, so packing a fake-quantized weight with
    # the same scale reproduces the same codes: GPTQ relies on that.
    # One fp32 copy, divided in place (never w itself, which may already be fp32).
    return w.to(torch.float32, copy=True).div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: None, spec: FormatSpec) -> torch.Tensor:
    """Quantize and dequantize w [out, k] with a scale broadcastable to it; returns fp32."""
    return _codes(w, scale).float() * scale


def pack(w: torch.Tensor, scale: torch.Tensor, zero_point: None, spec: FormatSpec) -> PackedTensor:
    """Pack w [out, in] with given per-row scale [out, 1]."""
    check_shape(tuple(w.shape), spec)
    codes = rowwise(_codes, w, scale, torch.float8_e4m3fn)  # row blocks: no whole-weight temporaries
    return PackedTensor(codes, scale.float().contiguous(), spec, tuple(w.shape))


def dequantize(p: PackedTensor) -> torch.Tensor:
    """Reference dequantizer: fp32 [out, in]."""
    return p.qdata.float() * p.scale.float()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: x [..., in] -> (codes float8_e4m3fn [..., in], scale fp32 [..., 1])."""
    scale = (row_absmax(x, dim=-1) / FP8_MAX).clamp_min(_TINY)
    return _codes(x, scale), scale



def static_scale(amax: float) -> torch.Tensor:
    """The per-tensor activation scale of a calibrated amax: fp32 scalar amax / 448 (> 0)."""
    return torch.tensor(max(float(amax) / FP8_MAX, _TINY), dtype=torch.float32)


def quantize_activations_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor fp8 codes of x with a calibrated `scale` (saturating, as ONNX QuantizeLinear)."""
    return _codes(x, scale)
