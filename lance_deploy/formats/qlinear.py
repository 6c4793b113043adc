"""`QLinear`: a Linear whose weight is a `PackedTensor`, held as plain buffers.

The forward pass dispatches on the spec recorded in the manifest and the device of the input:

| spec                 | CUDA                                          | elsewhere (reference path)          |
|----------------------|-----------------------------------------------|-------------------------------------|
| bf16                 | F.linear                                      | F.linear                            |
| fp8_e4m3 weight-only | dequantize -> matmul                          | dequantize -> matmul                |
| fp8_e4m3 W8A8        | `torch._scaled_mm`, row-wise scales (SM>=8.9) | fp8 activations, fp32 matmul        |
| int8 weight-only     | dequantize -> matmul                          | dequantize -> matmul                |
| int8 W8A8            | `torch._int_mm` (int32 accumulate)            | `torch._int_mm` on CPU (same math)  |
| int4                 | dequantize -> matmul                          | dequantize -> matmul                |
| nf4                  | bitsandbytes `matmul_4bit` if installed       | bitsandbytes if installed, else ref |

The reference paths compute exactly the math the format defines, so W8A8 quality (quantized
activations included) can be measured on CPU; the CUDA kernels are tested against them. When a
`smooth` vector is present the input is first divided by it, in the input's dtype.

No fused int4 GEMM is wired in yet: torch's tinygemm (`_weight_int4pack_mm`) wants bf16
scales and its own zero convention and tile layout, i.e. a second weight copy built at load.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from lance_deploy.formats import TENSOR_FIELDS, FormatError, FormatSpec, PackedTensor, dequantize, fp8, int8, validate


@functools.cache
def _bnb() -> ModuleType | None:
    """bitsandbytes if installed (imported on first use: it is heavy and optional)."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def _has_fp8_mma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class QLinear(nn.Module):
    """y = x Wᵀ + b with W stored packed. Buffers: qdata, scale, zero_point, smooth, bias.

    x: [..., in] in any float dtype; y: [..., out] in x's dtype. `prefer_reference=True`
    forces the reference path (used by tests and quality reports).
    """

    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None = None, prefer_reference: bool = False):
        super().__init__()
        validate(packed)
        self.spec: FormatSpec = packed.spec
        self.out_features, self.in_features = packed.shape
        self.prefer_reference = prefer_reference
        for field in TENSOR_FIELDS:
            self.register_buffer(field, getattr(packed, field))
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise FormatError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, packed: PackedTensor, **kwargs) -> QLinear:
        """Replace `linear` (same shape as `packed`), keeping its bias."""
        if tuple(linear.weight.shape) != tuple(packed.shape):
            raise FormatError(f"linear weight {tuple(linear.weight.shape)} != packed shape {packed.shape}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, bias, **kwargs)

    @property
    def packed(self) -> PackedTensor:
        """The buffers as a PackedTensor (sharing storage)."""
        fields = {f: getattr(self, f) for f in TENSOR_FIELDS}
        return PackedTensor(spec=self.spec, shape=(self.out_features, self.in_features), **fields)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.spec.label}"

    def kernel(self, x: torch.Tensor) -> str:
        """Name of the path `forward(x)` takes on x's device."""
        name, w8a8 = self.spec.name, self.spec.activations is not None
        cuda = x.is_cuda and not self.prefer_reference
        if name == "bf16":
            return "linear"
        if name == "fp8_e4m3" and w8a8:
            aligned = self.in_features % 16 == 0 and self.out_features % 16 == 0
            return "fp8_scaled_mm" if cuda and aligned and _has_fp8_mma(x.device) else "fp8_w8a8_reference"
        if name == "int8" and w8a8:
            return "int8_int_mm"
        if name == "nf4" and not self.prefer_reference and _bnb() is not None:
            return "nf4_bnb"
        return "dequant_matmul"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = (x.float() / self.smooth).to(x.dtype)
        kernel = self.kernel(x)
        if kernel == "linear":
            return F.linear(x, self.qdata.to(x.dtype), self._bias(x.dtype))
        if kernel == "dequant_matmul":
            return F.linear(x, dequantize(self.packed).to(x.dtype), self._bias(x.dtype))
        if kernel == "nf4_bnb":
            return _nf4_bnb(x, self.packed, self._bias(x.dtype))
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)
        if kernel == "fp8_scaled_mm":
            y = _fp8_scaled_mm(x2, self.qdata, self.scale)
        elif kernel == "fp8_w8a8_reference":
            y = _fp8_w8a8_reference(x2, self.qdata, self.scale)
        else:
            y = _int8_w8a8(x2, self.qdata, self.scale)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)


def _fp8_w8a8_reference(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [n, in] -> fp32 [n, out]: per-token fp8 activations, exact fp8 values, fp32 matmul."""
    xq, xs = fp8.quantize_activations(x)
    return (xq.float() @ qdata.float().t()) * xs * scale.float().t()


def _fp8_scaled_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 tensor-core GEMM with row-wise scales: x [n, in] -> fp32 [n, out] (bf16 accumulate-out)."""
    xq, xs = fp8.quantize_activations(x.contiguous())
    # qdata is [out, in] row-major, so .t() is the column-major [in, out] operand cuBLASLt wants.
    y = torch._scaled_mm(xq, qdata.t(), scale_a=xs, scale_b=scale.float().t(), out_dtype=torch.bfloat16)
    return y.float()


def _int8_w8a8(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [n, in] -> fp32 [n, out]: per-token int8 activations, int32-exact GEMM, fp32 epilogue."""
    xq, xs = int8.quantize_activations(x)
    return _int_mm(xq, qdata).float() * xs * scale.float().t()


def _int_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 [n, k] x int8 [out, k]ᵀ -> int32 [n, out], exact on every device."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq, wq.t())
    n, k = xq.shape
    if k % 8 or wq.shape[0] % 8:
        # cuBLAS needs k and out multiples of 8; products of int8 sum exactly in fp64 (< 2^53).
        return (xq.double() @ wq.double().t()).to(torch.int32)
    # cuBLAS needs more than 16 rows, and a contiguous second operand (torchao's safe_int_mm
    # notes wrong results otherwise), hence the pad and the transposed copy.
    rows = max(n, 17)
    xp = xq if rows == n else F.pad(xq, (0, 0, 0, rows - n))
    return torch._int_mm(xp, wq.t().contiguous())[:n]


def _nf4_bnb(x: torch.Tensor, p: PackedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bitsandbytes 4-bit matmul on our bytes (same layout as bnb's, see formats/nf4.py)."""
    bnb = _bnb()
    from bitsandbytes.functional import QuantState

    from lance_deploy.formats.nf4 import code_table

    state = QuantState(
        absmax=p.scale.reshape(-1).float(),
        shape=torch.Size(p.shape),
        code=code_table(p.qdata.device),
        blocksize=p.spec.group_size,
        quant_type="nf4",
        dtype=x.dtype,
    )
    return bnb.matmul_4bit(x, p.qdata.reshape(-1, 1).t(), bias=bias, quant_state=state)
