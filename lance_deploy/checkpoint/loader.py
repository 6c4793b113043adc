"""Stream checkpoint tensors into a module built on the meta device.

The module is created under ``torch.device('meta')`` (no memory; ``model/meta.py``), then each
parameter/buffer is read, cast and moved on its own and installed in place of
its meta placeholder. Host RAM therefore holds at most one tensor beyond what
has already been installed (on CPU) - never a whole state dict.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Mapping, TypeVar, Union

import torch
from torch import nn

from lance_deploy.checkpoint.names import key_mismatches
from lance_deploy.checkpoint.pages import drop_file_pages
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.config import LLMConfig
from lance_deploy.core.errors import CheckpointError
from lance_deploy.core.progress import advance
from lance_deploy.model.meta import build_on_meta
from lance_deploy.model.mot import MoTLayer
from lance_deploy.model.tree import layer_prefix

Source = Union[SafetensorsReader, Mapping[str, torch.Tensor]]
M = TypeVar("M", bound=nn.Module)


class FileStateDict(dict):
    """A state dict that remembers the file it came from (for error messages)."""

    path: Path


def _source_name(source: Source) -> str:
    return str(getattr(source, "path", None) or getattr(source, "name", None) or "state dict")


def _source_facts(source: Source, keys: list[str]) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """key -> (shape, stored dtype if it is not floating point), from the header alone for a reader."""
    if isinstance(source, SafetensorsReader):
        return {k: (i.shape, None if i.dtype.startswith(("F", "BF")) else i.dtype)
                for k in keys if k in source for i in [source.info(k)]}
    return {k: (tuple(t.shape), None if t.is_floating_point() else str(t.dtype).removeprefix("torch."))
            for k in keys if k in source for t in [source[k]]}


def _fetch(source: Source, key: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    if isinstance(source, SafetensorsReader):
        stored = source.info(key).dtype
        cast = dtype if dtype is not None and stored.startswith(("F", "BF")) else None
        return source.read(key, dtype=cast, device=device)
    src = source[key]
    cast = dtype if dtype is not None and src.is_floating_point() else None
    t = src.to(device=device, dtype=cast)
    if t.data_ptr() == src.data_ptr() and t.numel():
        # Same dtype on CPU: .to() returned the mmap-backed tensor itself; copy so the
        # module does not keep the checkpoint file mapped.
        t = t.clone()
    if isinstance(source, FileStateDict):
        drop_file_pages(src)  # the copy is made; the mapped pages need not stay resident
    return t


def _install(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if attr in owner._parameters:
        # requires_grad stays False: inference only, and it keeps autograd out of quantisation passes.
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:  # a state_dict entry from a custom hook; let the module handle it
        module.load_state_dict({name: value}, strict=False, assign=True)


def load_into(module: nn.Module, source: Source, *, dtype: torch.dtype | None,
              device: str | torch.device = "cpu", prefix: str = "",
              select: Callable[[str], bool] | None = None, strict: bool = True) -> list[str]:
    """Fill ``module``'s parameters and persistent buffers from ``source``, one tensor at a time.

    For each name in ``module.state_dict()`` (kept by ``select(name)`` if given) the
    tensor ``prefix + name`` is read from ``source`` (a ``SafetensorsReader`` or a
    mapping such as a ``torch.load(mmap=True)`` state dict), floating-point tensors
    are cast to ``dtype`` (``None`` keeps the stored dtype), moved to ``device``
    and installed with ``requires_grad=False``. Keys of ``source`` that the module
    does not have are not an error (one file feeds several modules). With
    ``strict`` every selected key must exist with the module's shape, checked
    before any data is read; otherwise absent keys are skipped. Returns the names
    that were not loaded (empty when strict). Non-persistent buffers are left alone.
    """
    device = torch.device(device)
    entries = module.state_dict(keep_vars=True)
    names = [n for n in entries if select is None or select(n)]
    want = {prefix + n: tuple(entries[n].shape) for n in names}
    floating = {prefix + n for n in names if entries[n].is_floating_point()}
    del entries
    facts = _source_facts(source, list(want))
    have = {k: shape for k, (shape, _) in facts.items()}
    problems = [p for p in key_mismatches(have, want) if not p.startswith("unexpected")]
    # a float weight relabelled as I32/U32 has the same byte length: only the dtype tells
    problems += [f"{k} is stored as {tag}, expected floating point"
                 for k, (_, tag) in facts.items() if k in floating and tag is not None]
    if not strict:  # absent keys are fine, wrong shapes never are
        problems = [p for p in problems if not p.startswith("missing")]
    if problems:
        more = f"; ... and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise CheckpointError(f"{_source_name(source)}: {len(problems)} tensors do not fit "
                              f"{type(module).__name__}: " + "; ".join(problems[:4]) + more)
    skipped = []
    for n in names:
        if prefix + n not in have:
            skipped.append(n)
            continue
        _install(module, n, _fetch(source, prefix + n, dtype, device))
        advance()  # a `load` progress bar, when a command opened one
    return skipped


def load_new(make: Callable[[], M], source: Source, *, dtype: torch.dtype | None,
             device: str | torch.device = "cpu", prefix: str = "") -> M:
    """``make()`` built on the meta device and filled from ``source`` by ``load_into``, in eval mode."""
    return build_on_meta(make, lambda m: load_into(m, source, dtype=dtype, device=device, prefix=prefix))


def load_layer(reader: SafetensorsReader, cfg: LLMConfig, index: int, *, with_gen: bool = True,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MoTLayer:
    """Decoder layer ``index`` alone from the release weights (fp32 by default: what calibration,
    quantization and export compute in)."""
    return load_new(lambda: MoTLayer(cfg, index, with_gen), reader, dtype=dtype, device=device,
                    prefix=layer_prefix(index))


def load_vae_state_dict(path: str | os.PathLike) -> FileStateDict:
    """Open ``Wan2.2_VAE.pth`` lazily: ``torch.load(weights_only=True, mmap=True)``.

    Only the pickle index is parsed; tensor data stays in the file until read.
    Any unreadable file becomes a one-line ``CheckpointError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected the Wan2.2 VAE state dict, Wan2.2_VAE.pth)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({first[:200]})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a plain state dict (name -> tensor), got {type(sd).__name__}")
    out = FileStateDict(sd)  # same mmap-backed tensors, no data read
    out.path = path
    return out
