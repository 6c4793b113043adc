"""Small building blocks shared by the Lance backbone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SwiGLU(nn.Module):
    """Qwen2 MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] (not x1000) -> hidden, via [cos, sin] features and an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # [N, half]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.time_dtype))

    @property
    def time_dtype(self) -> torch.dtype:
        """Compute dtype: the model's (the first Linear may be a packed QLinear with no `.weight`)."""
        return self.mlp[2].bias.dtype


def _sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-then-cos embedding of integer positions, computed in float64 like upstream's numpy."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = pos.to(torch.float64)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def latent_position_embedding(
    grid: tuple[int, int, int], hidden: int, max_latent_size: int = 64, device=None
) -> torch.Tensor:
    """The fixed 3-D sin-cos table rows for one latent block, computed on the fly.

    Upstream stores a [frames * 64 * 64, hidden] table indexed by t*64*64 + h*64 + w;
    we rebuild exactly those rows. Widths over 64 cells alias into the next row as
    upstream does (the flat index is decomposed again).
    Returns float32 [t*h*w, hidden].
    """
    t, h, w = grid
    s = max_latent_size
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    flat = (tt * s * s + hh * s + ww).flatten()
    pt, ph, pw = flat // (s * s), (flat // s) % s, flat % s
    d = hidden // 3
    d = d if d % 2 == 0 else d - 1
    dim_w = hidden - 2 * d
    emb = torch.cat([_sincos(d, pt), _sincos(d, ph), _sincos(dim_w, pw)], dim=1)
    return emb.float()
