"""Replay a just-quantized layer without rebuilding its weights at every call.

On the CPU an int4 / nf4 / bf16 QLinear builds its compute-dtype weight anew on every forward
(`QLinear.forward`'s 'dequant_matmul' and 'linear' paths). The propagation pass of the layer loop
runs every recorded call through the layer, thousands of calls for one weight, so for that pass
such Linears are swapped for a module holding the weight built once. It is the same tensor and
the same `F.linear`, so the outputs, and the artifact, are bit for bit what the QLinear gives.
W8A8 and int8 weight-only Linears keep their own kernels (and any hooks on them).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lance_deploy.formats.qlinear import QLinear

REBUILT = ("dequant_matmul", "linear")  # the QLinear paths that rebuild the weight per call


class _Built(nn.Module):
    """What `QLinear.forward` computes on those paths, with the weight already built."""

    def __init__(self, q: QLinear, dtype: torch.dtype, kernel: str):
        super().__init__()
        self.weight = q.qdata.to(dtype) if kernel == "linear" else q._dequantized(dtype)
        self.bias, self.smooth = q._bias(dtype), q.smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = (x.float() / self.smooth).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


@contextmanager
def weights_built_once(layer: nn.Module, dtype: torch.dtype = torch.float32):
    """Inside the block, the layer's rebuilding QLinears (for `dtype` inputs) hold a built weight."""
    swapped = []
    for name, module in list(layer.named_modules()):
        if not isinstance(module, QLinear):
            continue
        probe = torch.empty(1, module.in_features, dtype=dtype, device=module.qdata.device)
        kernel = module.kernel(probe)
        if kernel in REBUILT:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, _Built(module, dtype, kernel))
            swapped.append((parent, attr, module))
    try:
        yield layer
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
