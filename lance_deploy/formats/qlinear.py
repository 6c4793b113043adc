"""`QLinear`: a Linear whose weight is a `PackedTensor`, held as plain buffers.

The forward pass dispatches on the spec, the device and the row count of the input (decode:
1-16 rows; denoise: thousands). Kernels come from torch itself or bitsandbytes:

| spec              | CUDA, decode (<= 16 rows)                | CUDA, denoise (> 16 rows)      | CPU                             |
|-------------------|------------------------------------------|--------------------------------|---------------------------------|
| bf16              | F.linear                                 | F.linear                       | F.linear                        |
| fp8 weight-only   | dequantize (in bf16) -> cuBLAS           | same                           | same (reference)                |
| fp8 W8A8          | `torch._scaled_mm`, row-wise (SM >= 8.9) | same                           | fp8 activations, fp32 matmul    |
| int8 weight-only  | `torch._weight_int8pack_mm`              | dequantize (in bf16) -> cuBLAS | `torch._weight_int8pack_mm`     |
| int8 W8A8         | `torch._int_mm` (int32 accumulate)       | same                           | `torch._int_mm`                 |
| int4 (prepared)   | tinygemm `_weight_int4pack_mm` (sm80+)   | same                           | `_weight_int4pack_mm_for_cpu`   |
| int4 (plain)      | dequantize -> cuBLAS                     | same                           | dequantize (reference)          |
| nf4               | bitsandbytes `matmul_4bit` (its gemv)    | bnb (dequantize + matmul)      | bnb if installed, else ref      |

Why these: they are maintained with torch (tinygemm, the int8 weight-only kernel, cuBLASLt fp8
and int8 GEMMs) or are the format's own library (bitsandbytes), so no kernel code lives here.
torchao (0.18, checked beside torch 2.13) is not used: its int4 weight-only layouts call these
same tinygemm ops (`_weight_int4pack_mm`; `_weight_int4pack_mm_for_cpu` on the CPU), its int8
paths `_int_mm` or a cast + matmul (our dequantize + cuBLAS), all behind tensor subclasses that
the artifact format rules out; its own kernels (preshuffled int4 via fbgemm's mslk ops, mxfp8
CUTLASS) need another package or its CUDA extension built for the exact torch, which does not
even load on a CPU torch. A GPU run of benchmarks/kernels.py is where a better kernel would show.
fp8 weight-only has no fused kernel for bf16 activations: `_scaled_mm` multiplies two fp8
operands, so using it would quantize activations, i.e. the W8A8 spec, which a recipe chooses
explicitly (fp8-ada-hopper). The weight-only decode kernels are GEMV-shaped, so with thousands of
rows the dequantized weight through cuBLAS is the safe choice until benchmarks/kernels.py on a
GPU says otherwise. `prepare(device)` repacks once where a kernel wants its own layout (int4
tinygemm tiles and bf16 scale/zero pairs; int8 W8A8's contiguous [in, out] operand), replacing
the plain fields, so it adds no bytes; the artifact keeps the plain packed tensors. The planner
counts the plain fields (`formats.nbytes`), an upper bound of every repacked layout (int4
asymmetric drops its 1 B zero point per group; tests/formats/test_kernels_fake.py checks each
format at each Lance shape); the repack's scratch is one Linear's unpacked codes, freed at once.

The reference paths compute exactly the math the format defines, so W8A8 quality (quantized
activations included) can be measured on CPU; the fused paths are tested against them within
each format's SQNR floor (tests/formats/test_kernels.py), and every CUDA branch runs on fake CUDA
tensors at Lance's shapes (tests/formats/test_kernels_fake.py). When a `smooth` vector is present the
input is first divided by it, in the input's dtype.

`use_static_activations()` switches a W8A8 Linear to one calibrated per-tensor activation scale
(`act_amax`, recorded at quantize time): the exact arithmetic of the ``--target tensorrt`` Q/DQ
graph (fp32 DQ(Q(x)) @ DQ(w)ᵀ, ONNX saturation), used as its reference and to measure its cost.
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from lance_deploy.formats import TENSOR_FIELDS, FormatError, FormatSpec, PackedTensor, dequantize, fp8, int4, int8, validate


@functools.cache
def _bnb() -> ModuleType | None:
    """bitsandbytes if installed (imported on first use: it is heavy and optional)."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


_assumed_capability: tuple[int, int] | None = None  # set by a fake-CUDA rehearsal


@contextlib.contextmanager
def assume_capability(cap: tuple[int, int]):
    """Tell the CUDA paths the GPU is `cap` (e.g. (9, 0), an H100/H200) while the block runs."""
    global _assumed_capability
    prev, _assumed_capability = _assumed_capability, tuple(cap)
    try:
        yield
    finally:
        _assumed_capability = prev


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """SM version of a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    return _assumed_capability or torch.cuda.get_device_capability(device)


DECODE_ROWS = 16  # at or below: the weight-only GEMV-style kernels; above: dequantize + cuBLAS
HALF = (torch.bfloat16, torch.float16)
INNER_K_TILES = 8  # tinygemm's k tiling: in_features a multiple of 8 x 16 = 128 (every Lance Linear)


def _has_fp8_mma(device: torch.device) -> bool:
    return device.type == "cuda" and device_capability(device) >= (8, 9)


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
        if self.prepared == "int4_tinygemm" or self.prepared == "int4_cpu":
            raise FormatError(f"{self.spec.label}: repacked for {self.prepared}; the plain fields are in the artifact")
        fields = {f: getattr(self, f) for f in TENSOR_FIELDS if f != "qdata"}
        qdata = self.qdata if self.prepared != "int8_t" else self.qdata_t.t()
        return PackedTensor(spec=self.spec, shape=(self.out_features, self.in_features), qdata=qdata, **fields)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.spec.label}"

    # -- kernels ------------------------------------------------------------------------------
    prepared: str | None = None  # the kernel layout `prepare` repacked into (class default: none)
    act_amax: float | None = None  # W8A8: calibrated per-tensor amax of the (smoothed) input, from the artifact
    static_activations: bool = False  # W8A8: quantize inputs per tensor with act_amax (TensorRT's Q/DQ), not per token

    def use_static_activations(self, on: bool = True) -> None:
        """Switch a W8A8 Linear to static per-tensor activation scales (act_amax / QMAX), the math of
        a ``--target tensorrt`` Q/DQ graph; refused without a calibrated amax."""
        if on and (self.spec.activations is None or self.act_amax is None):
            raise FormatError(f"{self.spec.label}: static activation scales need a W8A8 Linear with a calibrated "
                              "act_amax (quantize with a calibration section)")
        self.static_activations = on

    def prepare(self, device=None) -> int:
        """Repack, once, into the layout the fused kernel of `device` wants, in place; returns the
        bytes this adds (<= 0: each layout replaces the plain fields it is made from).

        int4 -> tinygemm (`_weight_int4pack_mm`, sm80+; or its CPU twin): int32 tiles + bf16
        [groups, out, (scale, zero)] replace qdata / scale / zero_point (1 B per group smaller).
        int8 W8A8 on CUDA -> the weight transposed once into the contiguous [in, out] operand
        cuBLAS's int8 GEMM wants, instead of a transposed copy per forward. Other formats need
        nothing. The tensors stay where they are (host copies of a paged layer included); the
        conversion runs on `device`, whose kernel defines the layout."""
        device = torch.device(device or self.qdata.device)
        if self.prefer_reference or self.prepared:
            return 0
        before = self._field_bytes()
        tiles = self.in_features % (INNER_K_TILES * 16) == 0 and self.out_features % 8 == 0
        if self.spec.name == "int4" and tiles and (device.type == "cpu" or _sm80(device)):
            self._prepare_int4(device)
        elif self.spec.name == "int8" and self.spec.activations and device.type == "cuda":
            self.register_buffer("qdata_t", self.qdata.t().contiguous())
            self.qdata, self.prepared = None, "int8_t"
        return self._field_bytes() - before

    def _prepare_int4(self, device: torch.device) -> None:
        home = self.qdata.device
        codes = int4.unpack_nibbles(self.qdata.to(device))  # [out, in], 0..15
        scale = self.scale.to(device).float()
        zero = (int4.SYM_ZERO if self.zero_point is None else self.zero_point.to(device).float())
        # ours: (q - zp) * s; tinygemm: (q - 8) * s + z, so z = (8 - zp) * s
        sz = torch.stack([scale, (int4.SYM_ZERO - zero) * scale], dim=-1).transpose(0, 1).contiguous()
        if device.type == "cuda":
            w = torch.ops.aten._convert_weight_to_int4pack((codes[:, 0::2] << 4 | codes[:, 1::2]), INNER_K_TILES)
            self.prepared = "int4_tinygemm"
        else:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), INNER_K_TILES)
            self.prepared = "int4_cpu"
        self.register_buffer("i4_weight", w.to(home))
        self.register_buffer("i4_scale_zeros", sz.to(torch.bfloat16).to(home))
        self.qdata = self.scale = self.zero_point = None

    def _field_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self._buffers.items() if t is not None and n != "bias")

    def kernel(self, x: torch.Tensor) -> str:
        """Name of the path `forward(x)` takes on x's device (and its row count)."""
        name, w8a8 = self.spec.name, self.spec.activations is not None
        cuda = x.is_cuda
        if self.prepared in ("int4_tinygemm", "int4_cpu"):
            return self.prepared
        if w8a8 and self.static_activations:
            return "w8a8_static"
        if self.prefer_reference and name != "bf16":
            return "fp8_w8a8_reference" if name == "fp8_e4m3" and w8a8 else (
                "int8_int_mm" if name == "int8" and w8a8 else "dequant_matmul")
        rows = x.numel() // self.in_features
        if name == "bf16":
            return "linear"
        if name == "fp8_e4m3" and w8a8:
            aligned = self.in_features % 16 == 0 and self.out_features % 16 == 0
            return "fp8_scaled_mm" if cuda and aligned and _has_fp8_mma(x.device) else "fp8_w8a8_reference"
        if name == "int8" and w8a8:
            return "int8_int_mm"
        if name == "int8" and (not cuda or (rows <= DECODE_ROWS and x.dtype in HALF)):
            return "int8_weight_mm"  # x [n, in] . int8 [out, in] * scale: torch's fused weight-only kernel
        if name == "nf4" and _bnb() is not None:
            return "nf4_bnb"
        return "dequant_matmul"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # what this allocates beyond x at its peak is `input_transient_bytes` (the planner counts it)
        if self.smooth is not None:  # one fp32 copy divided in place, then back to x's dtype
            x = x.to(torch.float32, copy=True).div_(self.smooth).to(x.dtype)
        kernel = self.kernel(x)
        if kernel == "linear":
            return F.linear(x, self.qdata.to(x.dtype), self._bias(x.dtype))
        if kernel == "dequant_matmul":
            return F.linear(x, self._dequantized(x.dtype), self._bias(x.dtype))
        if kernel == "nf4_bnb":
            return _nf4_bnb(x, self.packed, self._bias(x.dtype))
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)
        if kernel == "int8_weight_mm":
            y = torch._weight_int8pack_mm(x2, self.qdata, self.scale.reshape(-1).to(x.dtype))
            return self._finish(y, lead, x.dtype)
        if kernel in ("int4_tinygemm", "int4_cpu"):
            mm = torch.ops.aten._weight_int4pack_mm if kernel == "int4_tinygemm" else \
                torch.ops.aten._weight_int4pack_mm_for_cpu
            sz = self.i4_scale_zeros if x.dtype == torch.bfloat16 or kernel == "int4_tinygemm" else \
                self.i4_scale_zeros.to(x.dtype)
            y = mm(x2.to(torch.bfloat16) if kernel == "int4_tinygemm" else x2, self.i4_weight,
                   self.spec.group_size, sz)
            return self._finish(y, lead, x.dtype)
        if kernel == "w8a8_static":
            w = self.qdata_t.t() if self.prepared == "int8_t" else self.qdata
            y = _w8a8_static(x2, w, self.scale, int8 if self.spec.name == "int8" else fp8, self.act_amax)
        elif kernel == "fp8_scaled_mm":
            y = _fp8_scaled_mm(x2, self.qdata.t(), self.scale)  # bf16, both scales applied
            if self.bias is not None:
                y = y.float()  # the bias added in fp32, as on every other path
        elif kernel == "fp8_w8a8_reference":
            y = _fp8_w8a8_reference(x2, self.qdata, self.scale)
        else:
            wt = self.qdata_t if self.prepared == "int8_t" else self.qdata.t()
            y = _int8_w8a8(x2, wt, self.scale, x.dtype if self.bias is None else torch.float32)
        return self._finish(y, lead, x.dtype)

    def _finish(self, y: torch.Tensor, lead, dtype) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(dtype).reshape(*lead, self.out_features)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight at the compute dtype, built in it: one [out, in] scratch, not an fp32 one
        and its cast (the planner counts one compute-dtype copy per Linear call). The reference
        path keeps the format's exact fp32 dequantization."""
        p = self.packed
        if p.spec.name in ("fp8_e4m3", "int8") and not self.prefer_reference:
            return p.qdata.to(dtype).mul_(p.scale.to(dtype))
        return dequantize(p).to(dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)


def _sm80(device: torch.device) -> bool:
    return device_capability(device) >= (8, 0)


def _fp8_w8a8_reference(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [n, in] -> fp32 [n, out]: per-token fp8 activations, exact fp8 values, fp32 matmul."""
    xq, xs = fp8.quantize_activations(x)
    return (xq.float() @ qdata.float().t()) * xs * scale.float().t()


def _fp8_scaled_mm(x: torch.Tensor, w_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 tensor-core GEMM with row-wise scales: x [n, in] . w_t [in, out] -> bf16 [n, out]. No fp32
    copy of the result: on an MLP's [rows, 11008] gate / up output it was the t2v denoise peak (2 GiB).

    `w_t` must be column-major (qdata [out, in] row-major, transposed as a view): cuBLASLt's
    fp8 GEMM takes no other layout, and `_scaled_mm` refuses one (the rehearsal test shows it)."""
    xq, xs = fp8.quantize_activations(x.contiguous())
    return torch._scaled_mm(xq, w_t, scale_a=xs, scale_b=scale.float().t(), out_dtype=torch.bfloat16)


def _w8a8_static(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, fmt, amax: float) -> torch.Tensor:
    """x [n, in] -> fp32 [n, out] with one calibrated activation scale: DQ(Q(x)) @ DQ(w)ᵀ in fp32,
    the arithmetic of the static Q/DQ graph (``export/qdq.py``), so onnxruntime matches it to fp32 rounding."""
    s = fmt.static_scale(amax).to(x.device)
    xq = fmt.quantize_activations_static(x, s)
    return (xq.float() * s) @ (qdata.float() * scale.float()).t()


EPILOGUE_SLICES = 8
"""int8 W8A8's fp32 epilogue runs on this many row slices of the int32 result: one fp32 slice lives
beside it, not a whole fp32 copy (on t2v's [rows, 11008] gate / up output, 1.4 GB less)."""


def _int8_w8a8(x: torch.Tensor, w_t: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [n, in] -> out_dtype [n, out]: per-token int8 activations, int32-exact GEMM, fp32 epilogue
    (int32 * x scale * w scale), rounded once to `out_dtype`: the values of the whole-tensor formula."""
    xq, xs = int8.quantize_activations(x)
    acc = _int_mm(xq, w_t)
    del xq
    w_scale = scale.float().t()
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    step = max(1, -(-acc.shape[0] // EPILOGUE_SLICES))
    for i in range(0, acc.shape[0], step):
        out[i:i + step] = acc[i:i + step].float().mul_(xs[i:i + step]).mul_(w_scale)
    return out


def _int_mm(xq: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """int8 [n, k] x int8 [k, out] -> int32 [n, out], exact on every device."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq, w_t)
    n, k = xq.shape
    if k % 8 or w_t.shape[1] % 8:
        # cuBLAS needs k and out multiples of 8; products of int8 sum exactly in fp64 (< 2^53).
        return (xq.double() @ w_t.double()).to(torch.int32)
    # cuBLAS needs more than 16 rows and a contiguous second operand (torchao's safe_int_mm notes
    # wrong results otherwise): `prepare` made it once; an unprepared module copies per call.
    rows = max(n, 17)
    xp = xq if rows == n else F.pad(xq, (0, 0, 0, rows - n))
    return torch._int_mm(xp, w_t.contiguous())[:n]


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


def input_transient_bytes(smooth: bool, w8a8: str | None) -> int:
    """Bytes per element of an expert's widest MLP tensor ([rows, intermediate]) that its packed
    Linears hold at their peak beyond a bf16 input or output, for rows where it matters (the
    denoise and prefill calls of thousands of rows); the planner counts this at the MLP moment.
    `w8a8`: the name of the format that quantizes activations ("fp8_e4m3", "int8"), or None.

    What `forward` holds, measured on fake CUDA (tests/formats/test_input_transients.py): the smooth
    division keeps one fp32 copy divided in place and the smoothed bf16 copy (6); per-token
    activation quantization one fp32 copy scaled in place beside its 1-byte codes (5, 7 after a
    smooth), on the down projection's input. On the gate / up outputs, int8's GEMM epilogue holds
    its int32 result and one fp32 row slice (`EPILOGUE_SLICES`: 4.5 beyond the output); fp8's
    `_scaled_mm` writes bf16 and holds nothing more.

    The figures: W8A8 5 and smoothed W8A8 7, each the measured most rounded up; smoothed weight-only
    7 too, from the int4 AWQ rows of the rehearsal matrix (the int4 path holds 5.6 at the down
    projection and something more not yet traced: with 5 those rows were up to 1.09x the plan, with
    8 down to 0.88x). Weight-only paths: 0 (their weight scratch is counted per call, not per row).
    fp8 W8A8 on a GPU without fp8 tensor cores (before sm89) takes the fp32 reference path, which
    holds more: use the int8 recipes there."""
    if smooth:
        return 7
    return 0 if w8a8 is None else 5


def expert_input_transients(linears) -> tuple[int, int]:
    """(und, gen): the most `input_transient_bytes` of each expert's packed Linears, from
    (expert, smooth?, W8A8 format name or None) triples; shared tensors (expert None) do not count."""
    most = {"und": 0, "gen": 0}
    for expert, smooth, w8a8 in linears:
        if expert in most:
            most[expert] = max(most[expert], input_transient_bytes(smooth, w8a8))
    return most["und"], most["gen"]
