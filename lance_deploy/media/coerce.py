"""Images and videos as Python callers hold them -> the uint8 RGB arrays the pipeline takes.

An image may be a path, a PIL image, a numpy array or a torch tensor: [H, W, 3] or [3, H, W]
(a leading batch dim of 1 is dropped), uint8, or float in [0, 1] (the diffusers convention).
A video is a path (file or frame folder), a list of such images, or an array / tensor with a
leading frame axis. Anything else is a one-line LanceUsageError naming the argument.
"""

from __future__ import annotations

import os

import numpy as np

from lance_deploy.core.errors import LanceUsageError


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_hwc_uint8(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or 0 in a.shape:
        raise LanceUsageError(f"{name}: expected an image [H, W, 3] or [3, H, W], got shape {list(a.shape)}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        raise LanceUsageError(f"{name}: expected uint8 or float pixels, got {a.dtype}")
    if np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise LanceUsageError(f"{name}: integer pixels must lie in 0..255")
        return a.astype(np.uint8)
    a = a.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise LanceUsageError(f"{name}: float pixels must be finite and in [0, 1]")
    return np.round(a * 255).astype(np.uint8)


def as_image(x, name: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] from a path, PIL image, numpy array or tensor."""
    from PIL import Image

    if isinstance(x, (str, os.PathLike)):
        from lance_deploy.media.io import read_image

        return read_image(os.path.expanduser(os.fspath(x)))
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"))
    if _is_tensor(x):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        a = x[0] if x.ndim == 4 and x.shape[0] == 1 else x
        return _to_hwc_uint8(a, name)
    raise LanceUsageError(f"{name}: expected a path, PIL image, numpy array or torch tensor, got {type(x).__name__}")


def as_video(x, fps: float | None, name: str = "video") -> tuple[np.ndarray, float | None]:
    """(uint8 [N, H, W, 3], fps): a path gives its own frame rate (unless `fps` overrides it)."""
    if isinstance(x, (str, os.PathLike)):
        from lance_deploy.media.io import read_video

        return read_video(os.path.expanduser(os.fspath(x)), fps)
    if isinstance(x, (list, tuple)):
        if not x:
            raise LanceUsageError(f"{name}: the list of frames is empty")
        frames = [as_image(f, f"{name}[{i}]") for i, f in enumerate(x)]
        if len({f.shape for f in frames}) != 1:
            raise LanceUsageError(f"{name}: every frame must have the same size")
        return np.stack(frames), fps
    if _is_tensor(x):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim != 4:
            raise LanceUsageError(f"{name}: expected frames [N, H, W, 3] or [N, 3, H, W], got shape {list(x.shape)}")
        return np.stack([_to_hwc_uint8(f, f"{name}[{i}]") for i, f in enumerate(x)]), fps
    raise LanceUsageError(f"{name}: expected a path, a list of images, a numpy array or a torch tensor, "
                          f"got {type(x).__name__}")
