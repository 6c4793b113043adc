"""The flow-matching sampler: shifted Euler schedule and text CFG with global renorm."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplerConfig:
    """Upstream defaults: 30 steps, shift 3.5, text CFG 4.0 inside (0.4, 1.0], global renorm."""

    steps: int = 30
    shift: float = 3.5
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    renorm_min: float = 0.0

    def cfg_active(self, t: float) -> bool:
        lo, hi = self.cfg_interval
        return self.cfg_scale > 1.0 and lo < t <= hi


def flow_schedule(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (t [steps], dt [steps]): t = s*u / (1 + (s-1)*u) over u = linspace(1, 0, steps+1)."""
    u = torch.linspace(1, 0, steps + 1)
    t = shift * u / (1 + (shift - 1) * u)
    return t[:-1], t[:-1] - t[1:]


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, renorm_min: float) -> torch.Tensor:
    """Text CFG, then rescale so the guided velocity's norm never exceeds the conditional one."""
    v = v_uncond + scale * (v_cond - v_uncond)
    ratio = (torch.linalg.vector_norm(v_cond) / (torch.linalg.vector_norm(v) + 1e-8)).clamp(min=renorm_min, max=1.0)
    return v * ratio
