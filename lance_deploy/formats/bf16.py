"""bf16: the weight kept as is (cast to bfloat16), for norms, embeddings and sensitive layers.

Fields for a logical [out, in] weight:
    qdata  bfloat16 [out, in]
(no scale). Dequantize: qdata.float().
"""

from __future__ import annotations

import torch

from .base import FormatSpec, Layout, PackedTensor, check_shape


def layout(shape: tuple[int, int], spec: FormatSpec) -> Layout:
    out, inn = check_shape(shape, spec)
    return {"qdata": ((out, inn), torch.bfloat16)}


def params(w: torch.Tensor, spec: FormatSpec) -> tuple[None, None]:
    """bf16 has no parameters."""
    return None, None


def fake_quant(w: torch.Tensor, scale: None, zero_point: None, spec: FormatSpec) -> torch.Tensor:
    return w.to(torch.bfloat16).float()


def pack(w: torch.Tensor, scale: None, zero_point: None, spec: FormatSpec) -> PackedTensor:
    check_shape(tuple(w.shape), spec)
    return PackedTensor(w.to(torch.bfloat16).contiguous(), None, spec, tuple(w.shape))


def dequantize(p: PackedTensor) -> torch.Tensor:
    return p.qdata.float()
