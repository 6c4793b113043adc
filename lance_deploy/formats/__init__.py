"""Packed weight formats: the only place that knows bits and bytes. Imports torch only.

Each format module (bf16, fp8, int8, int4, nf4) provides the same functions, and FORMATS maps
the manifest's format name to it:

    layout(shape, spec)            field -> (shape, dtype) table; the source of `nbytes`/`validate`
    params(w, spec)                round-to-nearest scale [, zero point] per scale group
    fake_quant(w, scale, zp, spec) quantize + dequantize with given (broadcastable) params, fp32
    pack(w, scale, zp, spec)       -> PackedTensor with given params (algorithms choose them)
    dequantize(p)                  slow pure-torch reference, fp32 [out, in]; kernels are tested
                                   against it

The functions below dispatch on `spec.name`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import bf16, fp8, int4, int8, nf4
from .base import (
    FORMAT_NAMES,
    TENSOR_FIELDS,
    FormatError,
    FormatSpec,
    Layout,
    PackedTensor,
    check_shape,
    expand_groups,
    scale_columns,
)

FORMATS: dict[str, ModuleType] = {"bf16": bf16, "fp8_e4m3": fp8, "int8": int8, "int4": int4, "nf4": nf4}

__all__ = [
    "FORMATS", "FORMAT_NAMES", "TENSOR_FIELDS", "FormatError", "FormatSpec", "Layout", "PackedTensor",
    "check_shape", "dequantize", "effective_weight", "expand_groups", "fake_quant_rtn", "layout",
    "nbytes", "pack", "params", "quantize_rtn", "scale_columns", "validate",
]  # fmt: skip


def _fmt(spec: FormatSpec) -> ModuleType:
    return FORMATS[spec.name]


def layout(shape: tuple[int, int], spec: FormatSpec) -> Layout:
    """Field table of a packed [out, in] weight: name -> (shape, dtype)."""
    return _fmt(spec).layout(shape, spec)


def nbytes(shape: tuple[int, int], spec: FormatSpec) -> int:
    """Stored bytes of a packed [out, in] weight, without the optional `smooth` ([in] fp32)."""
    total = 0
    for fshape, dtype in layout(shape, spec).values():
        n = 1
        for d in fshape:
            n *= d
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def params(w: torch.Tensor, spec: FormatSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Round-to-nearest (scale, zero_point) for w [out, k], one column per scale group."""
    return _fmt(spec).params(w, spec)


def pack(w: torch.Tensor, scale, zero_point, spec: FormatSpec) -> PackedTensor:
    """Pack w [out, in] with the given per-group params (shapes as in the format's layout)."""
    return _fmt(spec).pack(w, scale, zero_point, spec)


def quantize_rtn(w: torch.Tensor, spec: FormatSpec, name: str = "weight") -> PackedTensor:
    """Round-to-nearest reference quantization of w [out, in] (any float dtype)."""
    check_shape(tuple(w.shape), spec, name)
    return pack(w, *params(w, spec), spec)


def dequantize(p: PackedTensor) -> torch.Tensor:
    """Reference dequantization of the stored weight: fp32 [out, in] (`smooth` NOT divided out)."""
    return _fmt(p.spec).dequantize(p)


def effective_weight(p: PackedTensor) -> torch.Tensor:
    """The weight the layer applies to its un-smoothed input: dequantize(p) / smooth, fp32."""
    w = dequantize(p)
    return w if p.smooth is None else w / p.smooth.float()


def fake_quant_rtn(w: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """dequantize(quantize_rtn(w)) without packing: fp32 [out, in]."""
    scale, zero = params(w, spec)
    if scale is None:
        return _fmt(spec).fake_quant(w, None, None, spec)
    g = scale_columns(spec, w.shape[1])
    zb = None if zero is None else expand_groups(zero, g)
    return _fmt(spec).fake_quant(w, expand_groups(scale, g), zb, spec)


def validate(p: PackedTensor, name: str = "weight") -> PackedTensor:
    """Check every field's presence, shape and dtype against the layout; returns p."""
    table = layout(p.shape, p.spec)
    if p.smooth is not None:
        table = {**table, "smooth": ((p.shape[1],), torch.float32)}
    present = p.tensors()
    if extra := sorted(set(present) - set(table)):
        raise FormatError(f"{name}: unexpected fields {extra} for {p.spec.label}")
    for field, (fshape, dtype) in table.items():
        t = present.get(field)
        if t is None:
            raise FormatError(f"{name}: missing field {field!r} for {p.spec.label}")
        ok_dtype = t.dtype == dtype or (field == "scale" and t.dtype == torch.bfloat16)
        if tuple(t.shape) != fshape or not ok_dtype:
            raise FormatError(
                f"{name}.{field}: got {t.dtype} {tuple(t.shape)}, expected {dtype} {fshape} for {p.spec.label}"
            )
    return p
