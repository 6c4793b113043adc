"""AWQ: activation-aware per-input-channel scaling, then a per-group clipping search.

Lin et al. 2023 (arXiv 2306.00978). Two searches, both on the calibration rows that
`LayerStats` keeps (a uniform reservoir sample of the layer's inputs):

1. Scale. s = mean|x|^α, normalised, for α on a grid over [0, 1]; keep the α minimising
   ‖X Wᵀ − sim(X / s, W·diag(s))‖² where sim is the layer as it will run (weights fake-quantized,
   activations too for W8A8 specs). α = 0 is plain round-to-nearest, so on the calibration rows
   the result is never worse than RTN. Channels with large activations get scaled up before
   quantization, so their weights keep more relative precision.
2. Clip. Per (row, scale group), shrink the range to r·max|w| for r in {1.0, 0.95, …, 0.55} and
   keep the r minimising that group's output error (the AWQ reference's auto_clip).

The result is `AWQResult(packed, input_scale, alpha)`; see `scaling.py` for how 1/s is folded
into the preceding RMSNorm or kept as a runtime divisor, and use `awq_group` for Linears that
share one norm output (q/k/v, gate/up) so they get one s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lance_deploy.core.progress import bar
from lance_deploy.formats import (
    FormatSpec,
    check_shape,
    fake_quant_rtn,
    quantize_rtn,
    scale_columns,
)

from .scaling import ScaledResult, normalise, simulated_output
from .stats import LayerStats

PROGRESS_DELAY_S = 2.0  # a search shows its bar (under a command's progress mode) once it runs this long


class AWQResult(ScaledResult):
    """AWQ output: packed = Q(clip(W·diag(s))), input_scale = s [in] fp32, alpha = chosen α."""


def awq(weight: torch.Tensor, stats: LayerStats, spec: FormatSpec, *, grid: int = 20, clip: bool = True) -> AWQResult:
    """AWQ for one Linear: weight [out, in] (any float dtype) -> AWQResult."""
    return awq_group([weight], stats, spec, grid=grid, clip=clip)[0]


def awq_group(
    weights: Sequence[torch.Tensor], stats: LayerStats, spec: FormatSpec, *, grid: int = 20, clip: bool = True
) -> list[AWQResult]:
    """AWQ for Linears reading the same input (e.g. q/k/v): one shared s, searched on the summed
    output error; clipping is then searched per weight. Returns one AWQResult per weight."""
    ws = [w.detach().float() for w in weights]
    x = _calibration_rows(stats).to(ws[0].device)  # searches run where the weights are
    for i, w in enumerate(ws):
        check_shape(tuple(w.shape), spec, f"weight[{i}]")
    s, alpha = search_scale(x, torch.cat(ws), stats.mean_abs.to(x.device), spec, grid)
    results = []
    for w in ws:
        scaled = w * s
        if clip and spec.name != "bf16":
            scaled = search_clip(x / s, scaled, spec)
        results.append(AWQResult(quantize_rtn(scaled, spec), s, alpha))
    return results


def _calibration_rows(stats: LayerStats) -> torch.Tensor:
    if stats.rows.shape[0] == 0:
        raise ValueError("AWQ needs calibration rows: LayerStats.update() was never called")
    return stats.rows.float()


def search_scale(
    x: torch.Tensor, w: torch.Tensor, mean_abs: torch.Tensor, spec: FormatSpec, grid: int = 20
) -> tuple[torch.Tensor, float]:
    """Grid search of α for s = mean_abs^α: x [n, in], w [out, in] -> (s [in] fp32, α)."""
    ref = x @ w.t()  # [n, out]
    base = mean_abs.float().clamp_min(1e-6)
    best: tuple[float, torch.Tensor, float] | None = None
    with bar(grid, "awq α grid", unit="point", enabled=None, delay=PROGRESS_DELAY_S) as b:
        for alpha in torch.linspace(0, 1, grid).tolist():
            s = normalise(base.pow(alpha))
            err = (simulated_output(x, w, spec, s) - ref).pow(2).mean().item()
            if best is None or err < best[0]:
                best = (err, s, alpha)
            if b is not None:
                b.update(1)
    return best[1], best[2]


def search_clip(
    x: torch.Tensor, w: torch.Tensor, spec: FormatSpec, *, steps: int = 10, max_rows: int = 256, chunk: int = 512
) -> torch.Tensor:
    """Per (row, scale group) symmetric clipping of w [out, in] that minimises that group's output
    error on x [n, in] (already divided by s); returns the clipped weight, fp32 [out, in]."""
    g = scale_columns(spec, w.shape[1])
    xg = x[:max_rows].reshape(min(max_rows, x.shape[0]), -1, g).transpose(0, 1)  # [G, n, g]
    out = torch.empty_like(w)
    for r0 in range(0, w.shape[0], chunk):
        out[r0 : r0 + chunk] = _clip_rows(xg, w[r0 : r0 + chunk], spec, g, steps)
    return out


def _clip_rows(xg: torch.Tensor, w: torch.Tensor, spec: FormatSpec, g: int, steps: int) -> torch.Tensor:
    rows = w.shape[0]
    wg = w.reshape(rows, -1, g)  # [rows, G, g]
    amax = wg.abs().amax(dim=2, keepdim=True)  # [rows, G, 1]
    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)  # [rows, G]
    best = wg.clone()
    for i in range(steps):
        clipped = wg.clamp(-amax * (1 - i / 20), amax * (1 - i / 20))
        diff = wg - fake_quant_rtn(clipped.reshape(rows, -1), spec).reshape_as(wg)  # [rows, G, g]
        err = torch.bmm(xg, diff.permute(1, 2, 0)).pow(2).sum(dim=1).t()  # [G,n,g]@[G,g,rows] -> [rows, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), clipped, best)
    return best.reshape(rows, -1)
