"""`build-engine`: TensorRT engines from an export folder, with the TensorRT Python API.

Written against the documented TensorRT 10 API (Builder, OnnxParser, optimisation profiles,
memory-pool limits, timing cache, weight streaming); TensorRT is imported lazily and cannot be
installed on our CPU machines, so this module is exercised only where TensorRT exists.

Typing: a strongly typed network takes every precision from the ONNX graph, so fp8/int8 need
Q/DQ nodes in the graph (from quantization; TensorRT-side calibration is not offered), and
fp16/bf16 are strongly typed only for graphs exported in that dtype. An fp32 graph built at
fp16/bf16 uses the weakly typed builder flags while the installed TensorRT still has them
(TensorRT 11 dropped weak typing), and weight streaming requires a strongly typed network.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lance_deploy.artifact.graph_manifest import GraphEntry, load_manifest, safe_relative
from lance_deploy.core.errors import LanceError, LanceUsageError
from lance_deploy.core.fsutil import atomic_path
from lance_deploy.core.optional import require
from lance_deploy.export.trt_lint import errors as lint_errors
from lance_deploy.export.trt_lint import lint_graph, refusal
from lance_deploy.runtime.tensorrt import engine_dir, gpu_identity, tensorrt_module

PRECISIONS = ("fp16", "bf16", "fp8", "int8")
_TYPED = {"fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class EngineRequest:
    """Options of one `build-engine` run."""

    root: Path
    precision: str
    workspace_gib: float = 8.0
    tactic_dram_gib: float | None = None
    timing_cache: Path | None = None
    weight_streaming: bool = False
    graphs: tuple[str, ...] | None = None  # None = every graph in the manifest










def profile_shapes(entry: GraphEntry) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) shape per input from the manifest (static inputs: all three equal)."""
    shapes = {}
    for spec in entry.inputs:
        dims = [[], [], []]
        for d in spec.shape:
            if isinstance(d, str) and d not in entry.profiles:
                raise LanceUsageError(f"graph {entry.name}: dynamic axis {d!r} of {spec.name} has no profile")
            for k in range(3):
                dims[k].append(entry.profiles[d][k] if isinstance(d, str) else int(d))
        shapes[spec.name] = tuple(dims)
    return shapes


def has_qdq(path: Path) -> bool:
    """Whether the ONNX graph at `path` holds Q/DQ nodes (a quantized export)."""
    onnx = require("onnx")

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def typing_plan(trt, req: EngineRequest, entry: GraphEntry, path: Path) -> tuple[bool, list]:
    """(strongly_typed, builder flags) for this graph at req.precision, or a usage error."""
    dtype = next((s.dtype for s in entry.inputs if s.dtype.startswith(("float", "bfloat"))), "float32")
    if req.precision in ("fp8", "int8"):
        if not has_qdq(path):
            raise LanceUsageError(f"--precision {req.precision}: graph {entry.name} has no Q/DQ nodes; "
                                  "export a quantized model (TensorRT calibration is not supported)")
        return True, []
    if dtype == _TYPED[req.precision]:
        return True, []
    weak = getattr(trt.BuilderFlag, req.precision.upper(), None)
    if weak is None or req.weight_streaming:
        why = "--weight-streaming needs" if req.weight_streaming else f"TensorRT {trt.__version__} only builds"
        raise LanceUsageError(f"{why} strongly typed networks, and graph {entry.name} is {dtype}; "
                              f"export it in {_TYPED[req.precision]} for --precision {req.precision}")
    return False, [weak]


def build_one(trt, req: EngineRequest, entry: GraphEntry, cache_bytes: bytes) -> tuple[bytes, bytes, dict]:
    """Parse, configure and build one graph; returns (plan, timing cache, sidecar facts)."""
    path = safe_relative(req.root, entry.file, entry.name)
    strong, flags = typing_plan(trt, req, entry, path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # gone where all are typed
    network = builder.create_network(1 << int(typed_flag) if strong and typed_flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):  # resolves the .onnx.data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LanceError(f"{path}: TensorRT cannot parse the graph: {errors[0] if errors else 'unknown error'}"
                         + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    config = builder.create_builder_config()
    # Bounded tactic memory: unbounded tactic search on VAE graphs asks for more than the card has.
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_gib * (1 << 30)))
    if req.tactic_dram_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_DRAM, int(req.tactic_dram_gib * (1 << 30)))
    for flag in flags:
        config.set_flag(flag)
    if req.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    shapes = profile_shapes(entry)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LanceError(f"TensorRT failed to build graph {entry.name} (see its log above); "
                         "a smaller --workspace-gib or a smaller preset/tile may help")
    facts = {"strongly_typed": strong, "profiles": {k: list(v) for k, v in shapes.items()}}
    return bytes(plan), bytes(config.get_timing_cache().serialize()), facts


def build_engines(req: EngineRequest, log: Callable[[str], None] = lambda s: None) -> list[Path]:
    """Build every (selected) graph of the export folder; returns the written .plan paths."""
    if req.precision not in PRECISIONS:
        raise LanceUsageError(f"--precision {req.precision!r} is unknown; choose from {', '.join(PRECISIONS)}")
    manifest = load_manifest(req.root)
    unknown = sorted(set(req.graphs or ()) - {e.name for e in manifest.parts})
    if unknown:
        raise LanceUsageError(f"--graph {unknown[0]!r} is not in {req.root / 'manifest.json'}; "
                              f"choose from {', '.join(e.name for e in manifest.parts)}")
    entries = [e for e in manifest.parts if req.graphs is None or e.name in req.graphs]
    for entry in entries:  # the lint first: a graph TensorRT would refuse is named before any build
        findings = lint_graph(req.root, entry)
        if lint_errors(findings):
            raise LanceUsageError(refusal(entry.name, findings))
    trt = tensorrt_module()  # after the cheap checks, so usage errors are reported first
    gpu = gpu_identity()
    cache = req.timing_cache.read_bytes() if req.timing_cache and req.timing_cache.is_file() else b""
    out_dir, written = engine_dir(req.root, gpu), []
    for entry in entries:
        log(f"building {entry.name} ({req.precision})")
        plan, cache, facts = build_one(trt, req, entry, cache)
        target = out_dir / f"{entry.name}.plan"
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(plan)
        sidecar = dict(facts, graph=entry.name, part=entry.part, preset=entry.preset, precision=req.precision,
                       tensorrt=trt.__version__, gpu=gpu["name"], compute_capability=gpu["compute_capability"],
                       weight_streaming=req.weight_streaming, workspace_gib=req.workspace_gib,
                       onnx_sha256=entry.sha256.get(entry.file), built=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        with atomic_path(target.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        written.append(target)
    if req.timing_cache is not None:
        with atomic_path(req.timing_cache) as tmp:
            Path(tmp).write_bytes(cache)
    return written

