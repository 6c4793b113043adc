"""Quantization algorithms: pure functions (weight [out, in], LayerStats | None, FormatSpec) ->
a packed weight, plus, for the scaling methods, the per-input-channel scale the caller folds.

    rtn(weight, stats, spec)                 -> PackedTensor
    gptq(weight, stats, spec, ...)           -> PackedTensor
    awq(weight, stats, spec, ...)            -> AWQResult(packed, input_scale, alpha)
    awq_group(weights, stats, spec, ...)     -> list[AWQResult]        (one shared s)
    smoothquant(weight, stats, spec, alpha)  -> SmoothQuantResult(packed, input_scale, alpha)
    smoothquant_group(weights, ...)          -> list[SmoothQuantResult]

`scaling.py` documents the fold of input_scale (preceding RMSNorm, or `result.runtime()` for a
runtime divisor). Nothing under `lance_deploy.formats` or the runtime imports this package.
"""

from .awq import AWQResult, awq, awq_group
from .gptq import gptq
from .rtn import rtn
from .scaling import ScaledResult, fold_into_norm, simulated_output
from .smoothquant import SmoothQuantResult, smoothquant, smoothquant_group
from .stats import LayerStats

__all__ = [
    "AWQResult", "LayerStats", "ScaledResult", "SmoothQuantResult", "awq", "awq_group", "fold_into_norm",
    "gptq", "rtn", "simulated_output", "smoothquant", "smoothquant_group",
]  # fmt: skip
