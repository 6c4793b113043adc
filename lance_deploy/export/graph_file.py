"""One exported graph on disk: the trace folder, the static output sizes, and the checked
``graphs/<name>.onnx`` (+ ``.onnx.data``) with its manifest entry.

Shared by the plain export (``onnx_export``) and the Q/DQ export (``qdq``), which differ only
in how they trace.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lance_deploy.artifact.graph_manifest import GraphEntry, TensorSpec
from lance_deploy.core.fsutil import sha256_file
from lance_deploy.core.optional import require
from lance_deploy.export.parts import GraphJob

OPSET = 17
TARGETS = ("tensorrt", "onnxruntime")
DEFAULT_TARGET = "tensorrt"  # what `build-engine` takes; onnxruntime keeps dynamic per-token W8A8 scales
GRAPHS_DIR = "graphs"
EXTERNAL_THRESHOLD = 1024  # bytes: every weight tensor goes to the .data file, small constants stay inline


def onnx_modules():
    """(onnx, onnxruntime) or a LanceError with the install hint."""
    return require("onnx"), require("onnxruntime")


@contextmanager
def trace_dir(job: GraphJob, root: Path) -> Iterator[Path]:
    """A scratch folder in `root` for the raw trace of `job` (removed afterwards, also on failure)."""
    raw = Path(tempfile.mkdtemp(prefix=f".raw-{job.name}-", dir=root))
    try:
        yield raw
    finally:
        shutil.rmtree(raw, ignore_errors=True)


def pin_static_outputs(model, job: GraphJob) -> None:
    """Write concrete sizes into output dims the exporter left symbolic but that are not dynamic.

    The TorchScript exporter loses static sizes through some Reshapes (the VAE's unpatchify) and
    names them like 'Reshapepixels_dim_0'; engines and the manifest need the real numbers.
    """
    with torch.no_grad():
        outs = job.module(*job.args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    for value, tensor in zip(model.graph.output, outs):
        declared = job.dynamic_axes.get(value.name, {})
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis not in declared:
                dim.dim_value = int(tensor.shape[axis])  # setting the value clears dim_param


def _tensor_specs(values, onnx) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        specs.append(TensorSpec(v.name, str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), shape))
    return specs


def save_graph(model, job: GraphJob, root: Path, preset: str, meta: dict) -> GraphEntry:
    """Write `model` as root/graphs/<name>.onnx with its weights in <name>.onnx.data; check it and
    return its manifest entry (files, hashes, shapes, profiles)."""
    onnx, _ = onnx_modules()
    graphs = root / GRAPHS_DIR
    final, data = graphs / f"{job.name}.onnx", f"{job.name}.onnx.data"
    onnx.save_model(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=EXTERNAL_THRESHOLD)
    onnx.checker.check_model(str(final))
    external = [f"{GRAPHS_DIR}/{data}"] if (graphs / data).is_file() else []
    rel = f"{GRAPHS_DIR}/{final.name}"
    return GraphEntry(
        name=job.name, part=job.part, preset=preset, file=rel, external_data=external,
        sha256={p: sha256_file(root / p) for p in [rel, *external]},
        inputs=_tensor_specs(model.graph.input, onnx), outputs=_tensor_specs(model.graph.output, onnx),
        profiles=job.profiles, meta=meta,
    )
