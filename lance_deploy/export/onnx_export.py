"""`export onnx`: trace the requested parts into an export folder, atomically.

Exporter choice (``--exporter``, measured on torch 2.13 with the golden tiny checkpoint):

* ``auto`` (default): the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs
  ``onnxscript``) for the parts where its graphs verify: gen-layer, und-layer and vit (rel-L2
  2-6e-7 against PyTorch, the dynamic axes n / Lc kept dynamic, opset 18; it has no lowering
  below 18, and 18 is within TensorRT's 9-20). TorchScript (deprecated upstream) where dynamo
  cannot yet:
  - vae-decoder / vae-encoder: dynamo fails on the streaming chunk graphs ("Cannot copy out of
    meta tensor; no data!" while tracing their cache slots);
  - every Q/DQ graph (a quantized artifact): the ``lance_qdq::QLinear`` placeholder of
    ``qdq.py`` is a TorchScript symbolic; dynamo would need a custom-op translation instead.
* ``dynamo`` / ``torchscript`` force one exporter (dynamo is refused for Q/DQ graphs and is
  ~10x slower to export than TorchScript's 0.3-0.5 s per layer graph).

The dynamo wrappers keep the axes dynamic because they avoid the two things that make it
specialise: SDPA's ``enable_gqa`` and masks built from Python ints (anchors §5, pytorch#152018).

The folder is built beside ``--out`` and renamed into place only when every graph exported and
passed the ONNX checker, so a failed export never leaves a half-written folder behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import lance_deploy
from lance_deploy.artifact.graph_manifest import (
    MANIFEST,
    GraphEntry,
    Manifest,
    export_identity,
    load_manifest,
    write_manifest,
)
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.fsutil import remove_stale_siblings
from lance_deploy.core.lock import PathLock
from lance_deploy.core.optional import require
from lance_deploy.export.graph_file import (
    DEFAULT_TARGET,
    GRAPHS_DIR,
    OPSET,
    TARGETS,
    onnx_modules,
    pin_static_outputs,
    save_graph,
    trace_dir,
)
from lance_deploy.export.parts import BUILDERS, GraphJob
from lance_deploy.export.presets import PARTS, preset_shapes
from lance_deploy.export.sources import open_source

EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_PARTS = ("gen-layer", "und-layer", "vit")  # where dynamo's fp32 graphs verify (module docstring)
DYNAMO_OPSET = 18  # the lowest opset the dynamo exporter emits


@dataclass(frozen=True)
class ExportRequest:
    """What `export onnx` was asked to do."""

    model: Path
    parts: tuple[str, ...]
    preset: str
    out: Path
    aspect: str = "1:1"
    layers: tuple[int, ...] | None = None  # None = every layer
    vae_tile: tuple[int, int] | None = None  # None = the preset's aspect bucket (capped at 32 cells)
    exporter: str = "auto"
    target: str = DEFAULT_TARGET
    force: bool = False
    vit: Path | None = None
    vae: Path | None = None

    def identity_fields(self) -> dict:
        return {"parts": sorted(self.parts), "preset": self.preset, "aspect": self.aspect,
                "layers": None if self.layers is None else sorted(self.layers), "exporter": self.exporter,
                "vae_tile": None if self.vae_tile is None else list(self.vae_tile),
                "opset": OPSET, "dtype": "float32", "target": self.target}


def _check_request(req: ExportRequest) -> None:
    for part in req.parts:
        if part not in PARTS:
            raise LanceUsageError(f"--part {part!r} is unknown; choose from {', '.join(PARTS)}")
    if not req.parts:
        raise LanceUsageError(f"--part is required; choose from {', '.join(PARTS)}")
    if req.target not in TARGETS:
        raise LanceUsageError(f"--target {req.target!r} is unknown; choose from {', '.join(TARGETS)}")
    if req.exporter not in EXPORTERS:
        raise LanceUsageError(f"--exporter {req.exporter!r} is unknown; choose from {', '.join(EXPORTERS)}")
    if not req.model.exists():
        raise LanceUsageError(f"--model {req.model}: no such file or folder")


def _check_out(out: Path, identity: str, force: bool) -> None:
    """Refuse to replace something that is not the same export (unless --force, and never a non-export)."""
    if out.exists() and not out.is_dir():
        raise LanceUsageError(f"--out {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise LanceUsageError(f"--out {out} is not empty and holds no {MANIFEST}; choose a new or empty folder")
    try:
        existing = load_manifest(out)
        same, what = existing.identity() == identity, _describe(existing.request)
    except LanceUsageError:
        same, what = False, "an unreadable manifest"  # counts as "a different export"
    if not same and not force:
        raise LanceUsageError(f"--out {out} already holds a different export ({what}); pass --force to replace it")


def _describe(request: dict) -> str:
    return f"{'+'.join(request.get('parts', []))} at {request.get('preset')}, layers {request.get('layers') or 'all'}"


def exporter_for(job: GraphJob, requested: str, quantized: bool) -> str:
    """The exporter one graph is traced with (``auto``: see the module docstring)."""
    if quantized:
        if requested == "dynamo":
            raise LanceUsageError(f"--exporter dynamo: graph {job.name} holds quantized Linears, which only the "
                                  "TorchScript exporter lowers to Q/DQ (export/qdq.py); use --exporter auto")
        return "torchscript"
    if requested == "auto":
        return "dynamo" if job.part in DYNAMO_PARTS else "torchscript"
    return requested


def _trace(job: GraphJob, path: Path, exporter: str) -> None:
    kwargs = {"dynamo": False, "opset_version": OPSET} if exporter == "torchscript" else \
        {"dynamo": True, "optimize": True, "opset_version": DYNAMO_OPSET, "verbose": False}
    if exporter == "dynamo":
        require("onnxscript")
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        # Tracer / deprecation chatter only (dynamo prints its steps: kept off stdout, where --json goes);
        # dynamic-shape mistakes are caught by verify instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(job.module, job.args, str(path), input_names=job.input_names,
                          output_names=job.output_names, dynamic_axes=job.dynamic_axes or None,
                          do_constant_folding=True, **kwargs)


def export_graph(job: GraphJob, root: Path, preset: str, exporter: str = "auto",
                 target: str = DEFAULT_TARGET) -> GraphEntry:
    """Trace one job into root/graphs/<name>.onnx (+ .onnx.data) and describe it."""
    from lance_deploy.formats.qlinear import QLinear

    quantized = any(isinstance(m, QLinear) for m in job.module.modules())
    exporter = exporter_for(job, exporter, quantized)
    if quantized:  # quantized weights: Q/DQ graph
        from lance_deploy.export.qdq import export_qdq_graph

        return export_qdq_graph(job, root, preset, target=target)
    onnx, _ = onnx_modules()
    with trace_dir(job, root) as raw_dir:
        _trace(job, raw_dir / "model.onnx", exporter)
        model = onnx.load(str(raw_dir / "model.onnx"))  # pulls in any external data the exporter wrote
        pin_static_outputs(model, job)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        return save_graph(model, job, root, preset, dict(job.meta, opset=opset, exporter=exporter))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with two renames (the old folder is removed only afterwards)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_onnx(req: ExportRequest, log: Callable[[str], None] = lambda s: None) -> Manifest:
    """Export every requested part of `req.model` at `req.preset` into `req.out`; returns the manifest.
    One export per --out at a time: a second is refused naming the first (``core/lock.py``)."""
    _check_request(req)
    with PathLock(req.out.resolve(), "--out"):
        return _export_locked(req, log)


def _export_locked(req: ExportRequest, log: Callable[[str], None]) -> Manifest:
    shapes = preset_shapes(req.preset, req.aspect, req.vae_tile)
    onnx, _ = onnx_modules()
    source = open_source(req.model, vit=req.vit, vae=req.vae)
    source_info = source.fingerprint()
    identity = export_identity(source_info, req.identity_fields())
    out = req.out.resolve()
    _check_out(out, identity, req.force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later export remove what a killed one left (never a live one's).
    partial = f".{out.name}.partial-"
    for stale in remove_stale_siblings(out.parent, partial):
        log(f"removed {stale.name}, left by an export that was killed")
    tmp = Path(tempfile.mkdtemp(prefix=f"{partial}{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the export folder should look like any other
    try:
        (tmp / GRAPHS_DIR).mkdir()
        layers = list(req.layers) if req.layers is not None else list(range(source.cfg.num_hidden_layers))
        entries = []
        for part in PARTS:  # a fixed order, whatever order --part was given in
            if part not in req.parts:
                continue
            for job in BUILDERS[part](source, shapes, layers):
                log(f"exporting {job.name}")
                entries.append(export_graph(job, tmp, req.preset, req.exporter, req.target))
        producer = {"name": "lance-deploy", "version": lance_deploy.__version__, "torch": torch.__version__,
                    "onnx": onnx.__version__, "exporter": req.exporter}
        manifest = Manifest(producer=producer, source=source_info, request=req.identity_fields(), parts=entries)
        write_manifest(tmp, manifest)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
