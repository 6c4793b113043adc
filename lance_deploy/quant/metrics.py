"""Error metrics between a reference tensor and a quantized approximation of it.

All take (ref, test) of the same shape in any float dtype, compute in float64, and return a
Python float. Identical tensors give +inf for the dB metrics.
"""

from __future__ import annotations

import math

import torch


def _pair(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: ref {tuple(ref.shape)} vs test {tuple(test.shape)}")
    return ref.detach().double().flatten(), test.detach().double().flatten()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 20·log10(‖ref‖ / ‖ref − test‖), in dB."""
    r, t = _pair(ref, test)
    noise = (r - t).norm().item()
    return math.inf if noise == 0 else 20 * math.log10(r.norm().item() / noise)


def rel_l2(ref: torch.Tensor, test: torch.Tensor) -> float:
    """‖ref − test‖ / ‖ref‖ (0 for identical tensors)."""
    r, t = _pair(ref, test)
    return (r - t).norm().item() / max(r.norm().item(), 1e-300)


def cosine(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors."""
    r, t = _pair(ref, test)
    return torch.nn.functional.cosine_similarity(r, t, dim=0, eps=1e-300).item()


def psnr_db(ref: torch.Tensor, test: torch.Tensor, data_range: float | None = None) -> float:
    """Peak SNR, 10·log10(range² / MSE), in dB; range defaults to max(ref) − min(ref)."""
    r, t = _pair(ref, test)
    mse = (r - t).pow(2).mean().item()
    rng = (r.max() - r.min()).item() if data_range is None else float(data_range)
    return math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)
