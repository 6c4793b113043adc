"""`FormatSpec` (what a format is) and `PackedTensor` (one packed weight), both plain values.

A packed weight is a handful of plain tensors plus this dataclass, never a tensor subclass:
`.to()`, `.pin_memory()`, `nbytes` and safetensors I/O walk `TENSOR_FIELDS`, so a pager can move
one with ordinary copies. Which fields a format uses, and their exact shapes and dtypes, is the
`layout()` table in that format's module (fp8.py, int8.py, int4.py, nf4.py, bf16.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from lance_deploy.core.errors import LanceUsageError

SPEC_VERSION = 1
FORMAT_NAMES = ("bf16", "fp8_e4m3", "int8", "int4", "nf4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
NF4_BLOCK = 64  # bitsandbytes' default 4-bit blocksize; fixed so the layout needs no extra key
ACTIVATION_MODES = (None, "dynamic_per_token")
TENSOR_FIELDS = ("qdata", "scale", "zero_point", "smooth")


class FormatError(LanceUsageError, ValueError):
    """A spec, shape or packed tensor that a format cannot accept; the message names it."""


@dataclass(frozen=True)
class FormatSpec:
    """How one weight is stored, and (for W8A8) how its input activations are quantized.

    name:        one of FORMAT_NAMES.
    group_size:  int4: columns per scale group (32/64/128/256); nf4: always 64 (the absmax block);
                 None for per-output-channel formats (fp8_e4m3, int8) and bf16.
    symmetric:   None picks the format's default: False for int4 (asymmetric, uint8 zero point),
                 True for everything else (the only mode those formats support).
    activations: None (weight-only) or "dynamic_per_token" (fp8_e4m3/int8 W8A8: each input row
                 is quantized at run time with its own absmax scale).
    """

    name: str
    group_size: int | None = None
    symmetric: bool | None = None
    activations: str | None = None

    def __post_init__(self) -> None:
        if self.name not in FORMAT_NAMES:
            raise FormatError(f"unknown format {self.name!r}; allowed: {', '.join(FORMAT_NAMES)}")
        if self.name == "nf4" and self.group_size is None:
            object.__setattr__(self, "group_size", NF4_BLOCK)
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.name != "int4")
        self._validate()

    def _validate(self) -> None:
        n, g = self.name, self.group_size
        if n == "int4" and g not in INT4_GROUP_SIZES:
            raise FormatError(f"int4 group_size {g} not allowed; allowed: {INT4_GROUP_SIZES}")
        if n == "nf4" and g != NF4_BLOCK:
            raise FormatError(f"nf4 group_size {g} not allowed; nf4 uses absmax blocks of {NF4_BLOCK}")
        if n not in ("int4", "nf4") and g is not None:
            raise FormatError(f"{n} is per-output-channel; group_size must be None, got {g}")
        if n != "int4" and not self.symmetric:
            raise FormatError(f"{n} supports symmetric=True only")
        if self.activations not in ACTIVATION_MODES:
            raise FormatError(f"activations {self.activations!r} not allowed; allowed: {ACTIVATION_MODES}")
        if self.activations is not None and n not in ("fp8_e4m3", "int8"):
            raise FormatError(f"activations={self.activations!r} needs fp8_e4m3 or int8, not {n}")

    @property
    def label(self) -> str:
        """Readable name for plans and reports, e.g. 'int4-g128-asym', 'int8-w8a8'."""
        if self.name == "int4":
            return f"int4-g{self.group_size}-{'sym' if self.symmetric else 'asym'}"
        if self.name == "nf4":
            return f"nf4-b{self.group_size}"
        return self.name + ("-w8a8" if self.activations else "")

    def to_dict(self) -> dict[str, Any]:
        """Manifest JSON form, with every default resolved and a version key."""
        return {"version": SPEC_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FormatSpec:
        """Inverse of `to_dict`; refuses unknown keys and versions newer than this code."""
        d = dict(d)
        version = d.pop("version", None)
        if version != SPEC_VERSION:
            raise FormatError(f"format spec version {version!r} not supported; this code reads {SPEC_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise FormatError(f"unknown format spec keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def scale_columns(spec: FormatSpec, in_features: int) -> int:
    """Number of input columns that share one scale: the group, or the whole row."""
    return spec.group_size if spec.group_size is not None else in_features


def check_shape(shape: tuple[int, ...], spec: FormatSpec, name: str = "weight") -> tuple[int, int]:
    """Validate a logical [out, in] weight shape for `spec`; returns (out, in)."""
    if len(shape) != 2:
        raise FormatError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(shape)}")
    out, inn = int(shape[0]), int(shape[1])
    g = spec.group_size
    if g is not None and inn % g:
        raise FormatError(f"{name}: group_size {g} does not divide in_features {inn} ({spec.label})")
    return out, inn


@dataclass
class PackedTensor:
    """One packed weight of logical shape [out, in]; see the format module for field layouts.

    qdata:      packed codes (or the bf16 weight itself).
    scale:      fp32 dequantization scales; None only for bf16.
    zero_point: uint8 zero points (int4 asymmetric only).
    smooth:     fp32 [in] per-input-channel divisor applied to activations at run time
                (x / smooth) when an AWQ or SmoothQuant scale was not folded into a norm. The
                stored weight is then W·diag(smooth), so `effective_weight` divides it back out.
    """

    qdata: torch.Tensor
    scale: torch.Tensor | None
    spec: FormatSpec
    shape: tuple[int, int]
    zero_point: torch.Tensor | None = None
    smooth: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-None tensor fields, in TENSOR_FIELDS order."""
        return {f: t for f in TENSOR_FIELDS if (t := getattr(self, f)) is not None}

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedTensor:
        """A copy with `fn` applied to every tensor field (spec and shape unchanged)."""
        return dataclasses.replace(self, **{f: fn(t) for f, t in self.tensors().items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedTensor:
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedTensor:
        return self.apply(lambda t: t.pin_memory())

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        """Bytes of all tensor fields, `smooth` included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def with_smooth(self, smooth: torch.Tensor | None) -> PackedTensor:
        """A copy whose activations are divided by `smooth` ([in] fp32) at run time."""
        if smooth is not None and tuple(smooth.shape) != (self.shape[1],):
            raise FormatError(f"smooth has shape {tuple(smooth.shape)}, expected ({self.shape[1]},)")
        return dataclasses.replace(self, smooth=None if smooth is None else smooth.float().contiguous())

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat `{f"{prefix}.{field}": tensor}` for safetensors (contiguous, as it requires)."""
        return {f"{prefix}.{f}": t.contiguous() for f, t in self.tensors().items()}

    @classmethod
    def from_tensors(
        cls, prefix: str, tensors: Mapping[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, ...]
    ) -> PackedTensor:
        """Inverse of `to_tensors`. Spec and shape come from the manifest, never from the bytes;
        `formats.validate` then checks every field against the format's layout."""
        if f"{prefix}.qdata" not in tensors:
            raise FormatError(f"{prefix}: no '{prefix}.qdata' tensor")
        fields = {f: tensors.get(f"{prefix}.{f}") for f in TENSOR_FIELDS}
        return cls(spec=spec, shape=(int(shape[0]), int(shape[1])), **fields)


def expand_groups(t: torch.Tensor, columns: int) -> torch.Tensor:
    """[out, G] per-group values -> [out, G * columns], one per weight column."""
    return t.repeat_interleave(columns, dim=1)


Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""A format's field table: field name -> (shape, dtype), used by `nbytes` and `validate`."""


ROW_BLOCK_ELEMENTS = 1 << 17
"""Elements per block in `rowwise`: 512 KiB of fp32, so the temporaries stay in cache and under
the 1 MiB mmap threshold a quantize fixes (``core/host_memory.py``); whole-tensor temporaries
cost a fresh, page-faulted 90 MB per op on a full-size MLP weight."""


def rowwise(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], w: torch.Tensor, per_row: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """`fn(w, per_row)` computed in blocks of whole rows on the CPU (one call elsewhere): the same
    values, since `fn` is elementwise along each row with its row's `per_row` [out, 1] entry."""
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, w.shape[1]))
    if w.device.type != "cpu" or w.shape[0] <= rows or per_row.shape[0] != w.shape[0]:
        return fn(w, per_row)
    out = _host_empty(w.shape, dtype)
    for i in range(0, w.shape[0], rows):
        out[i:i + rows] = fn(w[i:i + rows], per_row[i:i + rows])
    return out


_host = threading.local()


@contextlib.contextmanager
def host_buffers(take: Callable[[int], torch.Tensor]):
    """In this thread, `rowwise` puts its codes into `take(nbytes)` (a uint8 tensor: a recycling
    pool, ``checkpoint/buffers.py``) instead of fresh pages the kernel must zero first."""
    before, _host.take = getattr(_host, "take", None), take
    try:
        yield
    finally:
        _host.take = before


def _host_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    take = getattr(_host, "take", None)
    if take is None:
        return torch.empty(shape, dtype=dtype)
    n = dtype.itemsize * int(torch.Size(shape).numel())
    return take(n).view(dtype).view(shape)


def row_absmax(w: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """max |w| along `dim` (kept, size 1) in fp32, without an |w| temporary: of w [out, k] -> [out, 1]."""
    w = w.float()
    return torch.maximum(w.amax(dim=dim, keepdim=True), w.amin(dim=dim, keepdim=True).neg_())
