"""Loading TensorRT engines on the GPU they were built for (the build side is `export.tensorrt_build`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lance_deploy.core.errors import LanceError, LanceUsageError
from lance_deploy.core.optional import require


def tensorrt_module():
    """`import tensorrt`, or a LanceError with the install hint."""
    return require("tensorrt")


def gpu_identity() -> dict:
    """Name and compute capability of CUDA device 0 (engines are only valid there)."""
    import torch

    if not torch.cuda.is_available():
        raise LanceError("build-engine needs a CUDA GPU (TensorRT engines are built on the target GPU)")
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def engine_dir(root: Path, gpu: dict) -> Path:
    """root/engines/<gpu-name>-sm<XY>, e.g. engines/nvidia-h100-80gb-hbm3-sm90."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-")
    return root / "engines" / f"{slug}-sm{gpu['compute_capability'].replace('.', '')}"


def check_engine_metadata(meta: dict, gpu: dict, trt_version: str, path: Path) -> None:
    """Refuse an engine built for another GPU / compute capability / TensorRT version."""
    built = (meta.get("gpu"), meta.get("compute_capability"), meta.get("tensorrt"))
    here = (gpu["name"], gpu["compute_capability"], trt_version)
    if built != here:
        raise LanceError(f"{path}: built on {built[0]} (sm {built[1]}, TensorRT {built[2]}), this is {here[0]} "
                         f"(sm {here[1]}, TensorRT {here[2]}); rebuild it here with `lance-deploy build-engine`")


def load_engine(plan: str | Path):
    """Deserialize a .plan after checking its sidecar against this GPU and TensorRT."""
    plan = Path(plan)
    sidecar = plan.with_suffix(".json")
    if not plan.is_file() or not sidecar.is_file():
        raise LanceUsageError(f"{plan}: engine or its {sidecar.name} sidecar not found")
    trt = tensorrt_module()
    check_engine_metadata(json.loads(sidecar.read_text()), gpu_identity(), trt.__version__, plan)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise LanceError(f"{plan}: TensorRT could not deserialize the engine")
    return engine

