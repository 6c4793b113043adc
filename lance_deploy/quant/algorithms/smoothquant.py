"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao et al. 2022 (arXiv 2211.10438). Per input channel j,
    s_j = max|X_j|^α / max|W_j|^(1−α)
with max|X_j| from `LayerStats.absmax` and max|W_j| over every weight reading that input. The
layer becomes (x / s) · Q(W·diag(s))ᵀ: the per-token activation scale is no longer set by a few
outlier channels, at the cost of wider weight columns, which per-output-channel weight scales
absorb well. α = 0.5 is the paper's default; `alpha=None` searches α on the calibration rows
for the smallest simulated W8A8 output error (α ∈ {0.05, 0.10, …, 0.95}).

Returns `SmoothQuantResult(packed, input_scale, alpha)`; folding s into the preceding RMSNorm
or keeping it as a runtime divisor is described in `scaling.py`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lance_deploy.formats import FormatSpec, check_shape, quantize_rtn

from .scaling import ScaledResult, normalise, simulated_output
from .stats import LayerStats


class SmoothQuantResult(ScaledResult):
    """SmoothQuant output: packed = Q(W·diag(s)), input_scale = s [in] fp32, alpha = α used."""


def smoothquant(
    weight: torch.Tensor, stats: LayerStats, spec: FormatSpec, alpha: float | None = 0.5
) -> SmoothQuantResult:
    """SmoothQuant for one Linear: weight [out, in] -> SmoothQuantResult."""
    return smoothquant_group([weight], stats, spec, alpha)[0]


def smoothquant_group(
    weights: Sequence[torch.Tensor], stats: LayerStats, spec: FormatSpec, alpha: float | None = 0.5
) -> list[SmoothQuantResult]:
    """SmoothQuant for Linears reading the same input (q/k/v, gate/up): one shared s."""
    ws = [w.detach().float() for w in weights]
    for i, w in enumerate(ws):
        check_shape(tuple(w.shape), spec, f"weight[{i}]")
    w_all = torch.cat(ws)
    if alpha is None:
        alpha = search_alpha(stats, w_all, spec)
    s = smooth_scale(stats.absmax.to(w_all.device), w_all, alpha)
    return [SmoothQuantResult(quantize_rtn(w * s, spec), s, alpha) for w in ws]


def smooth_scale(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1−α) per input channel: act_absmax [in], w [out, in] -> [in] fp32."""
    x_max = act_absmax.float().clamp_min(1e-5)
    w_max = w.float().abs().amax(dim=0).clamp_min(1e-5)
    return normalise((x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5))


def search_alpha(stats: LayerStats, w: torch.Tensor, spec: FormatSpec) -> float:
    """α in {0.05, …, 0.95} minimising the simulated output error on the calibration rows."""
    x = stats.rows.to(w.device, torch.float32)
    if x.shape[0] == 0:
        raise ValueError("SmoothQuant alpha search needs calibration rows: LayerStats.update() was never called")
    ref = x @ w.t()
    errs = {}
    for alpha in [round(0.05 * i, 2) for i in range(1, 20)]:
        s = smooth_scale(stats.absmax.to(w.device), w, alpha)
        errs[alpha] = (simulated_output(x, w, spec, s) - ref).pow(2).mean().item()
    return min(errs, key=errs.get)
