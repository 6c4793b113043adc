"""GPTQ: column-by-column quantization with Hessian-based error feedback.

Frantar et al. 2022 (arXiv 2210.17323). With H = 2·XᵀX over the calibration inputs (the factor
and the 1/n cancel out, so `LayerStats.hessian` = Σ xᵀx is used as is), each column is rounded
and its error is spread over the not-yet-quantized columns through the upper Cholesky factor of
H⁻¹, minimising ‖X Wᵀ − X Qᵀ‖². Lazy batch updates over blocks of 128 columns; dampening
λ = 1 % of mean(diag H); dead inputs (diag H = 0) get weight 0.

Scale groups: per-output-channel formats (fp8, int8) take their scale from the whole row up
front. Grouped formats (int4, nf4) take each group's params when its first column is reached,
from the error-updated weights (block sizes are kept multiples of the group size so a group
never straddles a block). With `act_order` columns go in order of decreasing diag H and group
params are computed from the original weights first ("static groups"), so the packed layout
stays contiguous groups with no g_idx permutation table.

Why our own ~100 lines rather than a library: GPTQModel's install pulls a CUDA toolkit and
replaces torch; llm-compressor's `quantize_weight` is pure torch but is tied to
compressed-tensors' QuantizationArgs and the package drags in transformers, datasets, pandas,
pyarrow and accelerate; AutoGPTQ is no longer developed. None packs into our formats, which is
where the work is: here the quantizer is the format's own `params`/`fake_quant`/`pack`, so
GPTQ output is bit-compatible with every runtime path by construction.
"""

from __future__ import annotations

import torch

from lance_deploy.core.progress import bar
from lance_deploy.formats import (
    FORMATS,
    FormatSpec,
    PackedTensor,
    check_shape,
    expand_groups,
    pack,
    params,
    scale_columns,
)

from .stats import LayerStats

PROGRESS_DELAY_S = 2.0  # the column bar shows (under a command's progress mode) once a weight takes this long


def gptq(
    weight: torch.Tensor,
    stats: LayerStats,
    spec: FormatSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    input_scale: torch.Tensor | None = None,
) -> PackedTensor:
    """GPTQ for one Linear: weight [out, in] -> PackedTensor.

    input_scale: an s [in] from SmoothQuant/AWQ; then W·diag(s) is quantized against the
    Hessian of x / s (the caller folds s as for those methods).
    """
    if stats.hessian is None:
        raise ValueError("GPTQ needs a Hessian: build LayerStats with hessian_dtype set")
    _, in_f = check_shape(tuple(weight.shape), spec)
    w = weight.detach().double()
    h = stats.hessian.to(w.device, torch.float64, copy=True)  # runs where the weight is
    if input_scale is not None:
        s = input_scale.to(w.device, torch.float64)
        w, h = w * s, h / s[:, None] / s[None, :]
    if spec.name == "bf16":
        return pack(w.float(), None, None, spec)
    g = scale_columns(spec, in_f)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f, device=w.device)
    # Static params (act-order or per-channel): from the dead-masked original weights.
    scale, zero = params(w.float(), spec) if (act_order or g == in_f) else (None, None)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp)
    # Dynamic groups are read from the block being updated, so blocks hold whole groups.
    block = block_size if scale is not None else -(-block_size // g) * g
    q, scale, zero = _quantize_columns(w, hinv, spec, g, perm, scale, zero, block)
    return pack(q[:, torch.argsort(perm)].float(), scale, zero, spec)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, fp64 [in, in]."""
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _quantize_columns(
    w: torch.Tensor,
    hinv: torch.Tensor,
    spec: FormatSpec,
    g: int,
    perm: torch.Tensor,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GPTQ loop over permuted columns; returns (Q permuted, scale, zero_point)."""
    fmt = FORMATS[spec.name]
    out_f, in_f = w.shape
    dynamic = scale is None  # grouped, natural order: params taken at each group start
    if dynamic:
        scale = torch.zeros(out_f, in_f // g, device=w.device)
        zero = None if spec.symmetric else torch.zeros(out_f, in_f // g, dtype=torch.uint8, device=w.device)
    col_scale = expand_groups(scale, g) if not dynamic else None
    col_zero = expand_groups(zero, g) if (not dynamic and zero is not None) else None
    q, order = torch.zeros_like(w), perm.tolist()  # a list: no device sync per column
    with bar(in_f, "gptq columns", unit="col", enabled=None, delay=PROGRESS_DELAY_S) as b:
        for b0 in range(0, in_f, block):
            _quantize_block(w, q, hinv, fmt, spec, g, order, b0, min(b0 + block, in_f), dynamic,
                            (scale, zero, col_scale, col_zero))
            if b is not None:
                b.update(min(block, in_f - b0))
    return q, scale, zero


def _quantize_block(w, q, hinv, fmt, spec: FormatSpec, g: int, order: list[int], b0: int, b1: int, dynamic: bool,
                    params_: tuple) -> None:
    """Columns b0..b1 (permuted order) of the GPTQ loop; updates w, q (and scale, zero when dynamic) in place."""
    scale, zero, col_scale, col_zero = params_
    w1, err1, hinv1 = w[:, b0:b1].clone(), torch.zeros_like(w[:, b0:b1]), hinv[b0:b1, b0:b1]
    for i in range(b1 - b0):
        col = order[b0 + i]
        if dynamic and col % g == 0:
            sc, zp = params(w1[:, i : i + g].float(), spec)
            scale[:, col // g : col // g + 1], cs, cz = sc, sc, zp
            if zero is not None:
                zero[:, col // g : col // g + 1] = zp
        elif not dynamic:
            cs = col_scale[:, col : col + 1]
            cz = None if col_zero is None else col_zero[:, col : col + 1]
        qc = fmt.fake_quant(w1[:, i : i + 1].float(), cs, cz, spec).double()  # [out, 1]
        q[:, b0 + i : b0 + i + 1] = qc
        e = (w1[:, i : i + 1] - qc) / hinv1[i, i]
        w1[:, i:] -= e @ hinv1[i : i + 1, i:]  # [out,1] @ [1, rest]
        err1[:, i : i + 1] = e
    w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
