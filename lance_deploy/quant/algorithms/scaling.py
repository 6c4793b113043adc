"""Per-input-channel scaling shared by AWQ and SmoothQuant: the result type, the norm fold, and
the simulated layer output both searches minimise.

Both methods quantize W·diag(s) instead of W, so the layer computes
    y = (x / s) · Q(W·diag(s))ᵀ
and `x / s` has to come from somewhere. Two places, chosen by the caller:

1. Fold into the preceding RMSNorm (free at run time): the norm's weight γ becomes γ / s
   (`fold_into_norm`). Only valid when every Linear reading that norm output uses the same s,
   so q/k/v (after input_layernorm) and gate/up (after post_attention_layernorm) must be
   searched together (`awq_group`, `smoothquant_group`).
2. Keep s as a runtime divisor (`result.runtime()` sets `PackedTensor.smooth`): for o_proj and
   down_proj, which read no norm. (Folding into v_proj for o_proj only works per head-compatible
   channel under GQA; the divisor is simpler and costs one [in] multiply.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lance_deploy.formats import FormatSpec, PackedTensor, fake_quant_rtn, fp8, int8


@dataclass
class ScaledResult:
    """packed: Q(W·diag(s)) with smooth=None; input_scale: s, fp32 [in]; alpha: chosen strength."""

    packed: PackedTensor
    input_scale: torch.Tensor
    alpha: float

    def runtime(self) -> PackedTensor:
        """The packed weight with s as its runtime activation divisor (no fold needed)."""
        return self.packed.with_smooth(self.input_scale)


def fold_into_norm(norm_weight: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight γ [in] -> γ / s, so the norm emits x / s; same dtype as γ."""
    return (norm_weight.float() / input_scale.float()).to(norm_weight.dtype)


def fake_quant_activations(x: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """What a W8A8 runtime feeds the GEMM: per-token fake-quantized x (identity if weight-only)."""
    if spec.activations is None:
        return x
    fmt = fp8 if spec.name == "fp8_e4m3" else int8
    q, scale = fmt.quantize_activations(x)
    return q.float() * scale


def simulated_output(x: torch.Tensor, w: torch.Tensor, spec: FormatSpec, s: torch.Tensor | None = None) -> torch.Tensor:
    """Layer output with quantized weights (and activations for W8A8): x [n, in], w [out, in]
    fp32 -> [n, out]. With s, the layer is (x / s) · Q(W·diag(s))ᵀ."""
    xs = x if s is None else x / s
    ws = w if s is None else w * s
    return fake_quant_activations(xs, spec) @ fake_quant_rtn(ws, spec).t()


def normalise(s: torch.Tensor) -> torch.Tensor:
    """Centre a positive scale vector geometrically (max·min = 1) so neither x / s nor W·s drifts
    towards fp8 overflow or subnormals; integer formats are invariant to this."""
    return s / (s.max() * s.min()).sqrt()
