"""The Wan2.2 VAE key table and a streaming writer for random ``Wan2.2_VAE.pth`` files.

Single source of truth for the key list is ``lance_deploy.model.vae.WanVAE`` (built
on the meta device) once that module exists; ``derived_vae_shapes`` reproduces the
upstream module structure (lance.md §4, golden README §2) and is the fallback
and the cross-check in the tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

Shapes = dict[str, tuple[int, ...]]

Z_DIM = 48
DIM_MULT = (1, 2, 4, 4)
TEMPORAL_DOWN = (False, True, True)
IN_CHANNELS = 12  # RGB after the 2x2 pixel patchify


def _residual(s: Shapes, pre: str, cin: int, cout: int) -> None:
    # residual = [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d]
    s[pre + "residual.0.gamma"] = (cin, 1, 1, 1)
    s[pre + "residual.2.weight"], s[pre + "residual.2.bias"] = (cout, cin, 3, 3, 3), (cout,)
    s[pre + "residual.3.gamma"] = (cout, 1, 1, 1)
    s[pre + "residual.6.weight"], s[pre + "residual.6.bias"] = (cout, cout, 3, 3, 3), (cout,)
    if cin != cout:
        s[pre + "shortcut.weight"], s[pre + "shortcut.bias"] = (cout, cin, 1, 1, 1), (cout,)


def _attention(s: Shapes, pre: str, c: int) -> None:
    s[pre + "norm.gamma"] = (c, 1, 1)
    s[pre + "to_qkv.weight"], s[pre + "to_qkv.bias"] = (3 * c, c, 1, 1), (3 * c,)
    s[pre + "proj.weight"], s[pre + "proj.bias"] = (c, c, 1, 1), (c,)


def _resample(s: Shapes, pre: str, c: int, temporal: bool, up: bool) -> None:
    s[pre + "resample.1.weight"], s[pre + "resample.1.bias"] = (c, c, 3, 3), (c,)
    if temporal:  # up: time_conv doubles channels, then a depth-to-time shuffle
        t_out = 2 * c if up else c
        s[pre + "time_conv.weight"], s[pre + "time_conv.bias"] = (t_out, c, 3, 1, 1), (t_out,)


def derived_vae_shapes(enc_dim: int = 160, dec_dim: int = 256, z_dim: int = Z_DIM) -> Shapes:
    """Key -> shape of the 48-channel Wan2.2 VAE state dict, in module order."""
    s: Shapes = {}
    dims = [enc_dim * m for m in (1,) + DIM_MULT]
    s["encoder.conv1.weight"], s["encoder.conv1.bias"] = (dims[0], IN_CHANNELS, 3, 3, 3), (dims[0],)
    last = len(DIM_MULT) - 1
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        pre = f"encoder.downsamples.{i}.downsamples."
        for j in range(2):
            _residual(s, f"{pre}{j}.", cin if j == 0 else cout, cout)
        if i != last:
            _resample(s, f"{pre}2.", cout, temporal=TEMPORAL_DOWN[i], up=False)
    c = dims[-1]
    _residual(s, "encoder.middle.0.", c, c)
    _attention(s, "encoder.middle.1.", c)
    _residual(s, "encoder.middle.2.", c, c)
    s["encoder.head.0.gamma"] = (c, 1, 1, 1)
    s["encoder.head.2.weight"], s["encoder.head.2.bias"] = (2 * z_dim, c, 3, 3, 3), (2 * z_dim,)
    s["conv1.weight"], s["conv1.bias"] = (2 * z_dim, 2 * z_dim, 1, 1, 1), (2 * z_dim,)
    s["conv2.weight"], s["conv2.bias"] = (z_dim, z_dim, 1, 1, 1), (z_dim,)

    dims = [dec_dim * m for m in (DIM_MULT[-1],) + DIM_MULT[::-1]]
    temporal_up = TEMPORAL_DOWN[::-1]
    s["decoder.conv1.weight"], s["decoder.conv1.bias"] = (dims[0], z_dim, 3, 3, 3), (dims[0],)
    c = dims[0]
    _residual(s, "decoder.middle.0.", c, c)
    _attention(s, "decoder.middle.1.", c)
    _residual(s, "decoder.middle.2.", c, c)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        pre = f"decoder.upsamples.{i}.upsamples."
        for j in range(3):
            _residual(s, f"{pre}{j}.", cin if j == 0 else cout, cout)
        if i != last:
            _resample(s, f"{pre}3.", cout, temporal=temporal_up[i], up=True)
    s["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    s["decoder.head.2.weight"], s["decoder.head.2.bias"] = (IN_CHANNELS, dims[-1], 3, 3, 3), (IN_CHANNELS,)
    return s


def vae_shapes(enc_dim: int = 160, dec_dim: int = 256) -> Shapes:
    """Key -> shape, from ``WanVAE`` on the meta device when available, else derived."""
    if importlib.util.find_spec("lance_deploy.model.vae") is None:
        return derived_vae_shapes(enc_dim, dec_dim)
    from lance_deploy.model.vae import WanVAE

    with torch.device("meta"):
        module = WanVAE(enc_dim=enc_dim, dec_dim=dec_dim)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write_vae_pth(path: Path, shapes: Shapes, make: Callable[[str, tuple[int, ...]], torch.Tensor],
                  progress: Callable[[int], None] = lambda n: None) -> None:
    """Write a plain ``torch.save`` state dict (F32) without holding it in RAM.

    ``torch.save`` needs every tensor at once, so each generated tensor is parked in
    a file-backed shared mapping (``torch.from_file``): its pages belong to the page
    cache and can be written back and dropped, unlike anonymous memory. The
    scratch files are deleted afterwards.
    """
    scratch = path.with_name(f".{path.name}.scratch-{os.getpid()}")
    scratch.mkdir(parents=True, exist_ok=False)
    try:
        state: OrderedDict[str, torch.Tensor] = OrderedDict()
        for n, (key, shape) in enumerate(shapes.items()):
            value = make(key, shape).to(torch.float32)
            numel = value.numel()
            if numel:
                backed = torch.from_file(str(scratch / f"{n}.bin"), shared=True, size=numel, dtype=torch.float32)
                backed.copy_(value.reshape(-1))
                value = backed.view(shape)
            state[key] = value
            progress(numel * 4)
        torch.save(state, path)
        del state
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
