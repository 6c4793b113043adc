"""3-axis multimodal rotary embedding (MRoPE) of Qwen2.5-VL."""

from __future__ import annotations

import torch


def mrope_cos_sin(
    pos: torch.Tensor, head_dim: int, theta: float, section: tuple[int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [3, L] (t, h, w) -> (cos, sin) each [L, head_dim].

    Frequencies are split into `section` pairs per axis (t, h, w); each half of the
    rotated dimension takes its sections from the matching axis.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=pos.device).float() / head_dim))
    freqs = pos.float()[:, :, None] * inv_freq[None, None, :]  # [3, L, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [3, L, head_dim]
    cos, sin = emb.cos(), emb.sin()
    sizes = list(section) * 2
    cos = torch.cat([c[i % 3] for i, c in enumerate(cos.split(sizes, dim=-1))], dim=-1)
    sin = torch.cat([s[i % 3] for i, s in enumerate(sin.split(sizes, dim=-1))], dim=-1)
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [L, heads, head_dim]; cos/sin [L, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin
