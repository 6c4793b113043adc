"""Round-to-nearest: the baseline every calibrated algorithm must beat."""

from __future__ import annotations

import torch

from lance_deploy.formats import FormatSpec, PackedTensor, quantize_rtn

from .stats import LayerStats


def rtn(weight: torch.Tensor, stats: LayerStats | None, spec: FormatSpec) -> PackedTensor:
    """weight [out, in] -> PackedTensor with the format's round-to-nearest params; stats unused."""
    return quantize_rtn(weight, spec)
