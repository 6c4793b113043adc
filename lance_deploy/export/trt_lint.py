"""TensorRT-compatibility lint: an exported graph against what TensorRT 10's ONNX parser documents.

Checks (the table and its sources: ``export/trt_support.py``):

* the default-domain opset is within 9..20, or 21 only for INT4 block-quantized weights (a note:
  outside the documented range, but the parser reads it and ONNX has INT4 only there); no
  custom domains; every operator is in the supported list;
* every QuantizeLinear / DequantizeLinear: scale and zero point are initializers (or Constant
  nodes), the scales positive, the zero points 0; the quantized type is INT8, FP8 or INT4 (no
  UINT8 / UINT4); activation (Q) scales are per tensor; INT4 and block scales only on a DQ of
  an initializer (weight-only, as TensorRT supports them);
* no Gather-based dequantization (nf4's code-table lookup);
* every dynamic input axis has an optimisation profile in the export manifest.

Each finding names the node and says what to change. Errors fail `verify` for a
``--target tensorrt`` export, and `build-engine` refuses to start with the first one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lance_deploy.artifact.graph_manifest import GraphEntry, safe_relative
from lance_deploy.core.optional import require
from lance_deploy.export.trt_support import (
    BLOCK_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    OPERATORS,
    QUANTIZED_TYPES,
    WEIGHT_ONLY_TYPES,
)

QDQ = ("QuantizeLinear", "DequantizeLinear")
PASS_THROUGH = ("Cast", "Reshape", "Identity", "Transpose", "Unsqueeze", "Squeeze")
FOUR_BIT_FIX = "quantize these Linears as symmetric int4 (symmetric: true), int8 or fp8_e4m3 for --target tensorrt"


@dataclass(frozen=True)
class Finding:
    """One problem: the node (or input) it is in, what is wrong, what to change; 'error' or 'note'."""

    node: str
    op: str
    problem: str
    fix: str
    severity: str = "error"

    def line(self) -> str:
        return f"node {self.node} ({self.op}): {self.problem}; {self.fix}"

    def to_dict(self) -> dict:
        return asdict(self)


class _Graph:
    """Initializers (loaded lazily, external data included), Constant outputs and producers."""

    def __init__(self, model, base_dir: Path | None):
        self.model, self.base = model, base_dir
        self.inits = {t.name: t for t in model.graph.initializer}
        self.consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.producer = {o: n for n in model.graph.node for o in n.output}

    def is_constant(self, name: str) -> bool:
        return name in self.inits or name in self.consts

    def tensor(self, name: str):
        """The TensorProto of an initializer / Constant (None if computed)."""
        onnx = require("onnx")
        if name in self.consts:
            return next(a.t for a in self.consts[name].attribute if a.name == "value")
        t = self.inits.get(name)
        if t is not None and t.data_location == onnx.TensorProto.EXTERNAL and self.base is not None:
            from onnx.external_data_helper import load_external_data_for_tensor

            t = type(t).FromString(t.SerializeToString())  # a copy: the caller's model stays light
            load_external_data_for_tensor(t, str(self.base))
        return t

    def array(self, name: str) -> np.ndarray | None:
        t = self.tensor(name)
        if t is None:
            return None
        from onnx import numpy_helper

        return numpy_helper.to_array(t)

    def dtype_name(self, name: str) -> str | None:
        """The element type of a constant, without reading its (possibly external) data."""
        onnx = require("onnx")
        t = self.inits.get(name)
        if t is None and name in self.consts:
            t = self.tensor(name)
        return None if t is None else onnx.TensorProto.DataType.Name(t.data_type)


def _qdq_type(g: _Graph, node) -> str | None:
    """The quantized type of a Q (zero point or output_dtype; ONNX's default is UINT8) or DQ (its input)."""
    onnx = require("onnx")
    if node.op_type == "DequantizeLinear":
        name = g.dtype_name(node.input[0])
        if name is not None:
            return name
        src = g.producer.get(node.input[0])
        return _qdq_type(g, src) if src is not None and src.op_type == "QuantizeLinear" else None
    if len(node.input) > 2 and node.input[2]:
        return g.dtype_name(node.input[2])
    out = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
    return onnx.TensorProto.DataType.Name(out) if out else "UINT8"


def _on_weight(g: _Graph, node) -> bool:
    """A Q/DQ of an initializer, or the DQ of such a Q (fake-quantized weights, as ModelOpt writes them)."""
    if node.input[0] in g.inits or node.input[0] in g.consts:
        return True
    src = g.producer.get(node.input[0])
    return node.op_type == "DequantizeLinear" and src is not None and src.op_type == "QuantizeLinear" and \
        (src.input[0] in g.inits or src.input[0] in g.consts)


def _check_qdq(g: _Graph, node, out: list[Finding]) -> None:
    name, op = node.name or node.output[0], node.op_type
    weight = _on_weight(g, node)

    def bad(problem: str, fix: str) -> None:
        out.append(Finding(name, op, problem, fix))

    scale = node.input[1]
    if not g.is_constant(scale):
        bad("the scale is computed at run time (dynamic quantization); TensorRT needs build-time constant scales",
            "export with --target tensorrt, which writes the calibrated static per-tensor activation scales")
    else:
        s = g.array(scale)
        if s is not None and not (s.astype(np.float64) > 0).all():
            bad("a scale is not positive (TensorRT requires every scale > 0)", "re-quantize: scales must be > 0")
        if s is not None and s.size != 1 and not weight:
            bad(f"the activation scale has {s.size} values (per-axis); TensorRT quantizes activations per tensor",
                "export with --target tensorrt (one calibrated scale per Linear input)")
        if s is not None and s.ndim > 1 and not weight:
            bad("block-quantized scales on an activation", "use block (int4) quantization for weights only")
    if len(node.input) > 2 and node.input[2]:
        if not g.is_constant(node.input[2]):
            bad("the zero point is computed at run time", "use a constant zero point of 0")
        else:
            z = g.array(node.input[2])
            if z is not None and np.any(z.astype(np.float64) != 0):
                bad("a zero point is not 0 (TensorRT supports symmetric quantization only)",
                    FOUR_BIT_FIX if "4" in str(g.dtype_name(node.input[2])) else "use symmetric quantization")
    qtype = _qdq_type(g, node)
    if qtype is not None and qtype not in QUANTIZED_TYPES:
        fix = FOUR_BIT_FIX if "4" in qtype else "give the Q/DQ an explicit INT8 or FLOAT8E4M3FN zero point of 0"
        bad(f"quantized type {qtype} is not one of TensorRT's ({', '.join(QUANTIZED_TYPES)})", fix)
    if qtype in WEIGHT_ONLY_TYPES and not weight:
        bad(f"{qtype} is supported for weights only (DequantizeLinear of an initializer)",
            "keep 4-bit formats weight-only (no 4-bit activations)")


def _gather_dequant(g: _Graph, node) -> bool:
    """A Gather whose indices come (through casts/reshapes) from a DequantizeLinear: a code-table lookup."""
    src, seen = g.producer.get(node.input[1]), 0
    while src is not None and seen < 8:
        if src.op_type == "DequantizeLinear":
            return True
        if src.op_type not in PASS_THROUGH:
            return False
        src, seen = g.producer.get(src.input[0]), seen + 1
    return False


def lint_model(model, entry: GraphEntry | None = None, base_dir: Path | None = None) -> list[Finding]:
    """Findings for an ONNX ModelProto (external data read from `base_dir` where needed)."""
    g, out = _Graph(model, base_dir), []
    opsets = {o.domain or "": o.version for o in model.opset_import}
    four_bit_blocks = any(n.op_type == "DequantizeLinear" and _qdq_type(g, n) in ("INT4", "UINT4")
                          for n in model.graph.node)
    version = opsets.get("", opsets.get("ai.onnx", 0))
    if version == BLOCK_OPSET and four_bit_blocks:
        out.append(Finding("<model>", "opset", f"opset {version} is above TensorRT 10.0's documented {MIN_OPSET}-"
                           f"{MAX_OPSET}; ONNX has INT4 block DQ only at {BLOCK_OPSET}, and the parser accepts it "
                           "(it infers the block from the scale's shape)", "nothing, on TensorRT >= 10; confirm the "
                           "build on the target", "note"))
    elif not MIN_OPSET <= version <= MAX_OPSET:
        out.append(Finding("<model>", "opset", f"opset {version} is outside TensorRT 10's documented {MIN_OPSET}-"
                           f"{MAX_OPSET}", f"export with --target tensorrt (opset {MAX_OPSET})"))
    for domain in sorted(set(opsets) - {"", "ai.onnx"}):
        out.append(Finding("<model>", "opset", f"custom domain {domain!r}", "export standard ONNX operators only"))
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPERATORS:
            out.append(Finding(name, node.op_type, f"operator {node.domain + '::' if node.domain else ''}"
                               f"{node.op_type} is not in TensorRT's supported list", "rewrite it with supported ops"))
        elif node.op_type in QDQ:
            _check_qdq(g, node, out)
        elif node.op_type == "Gather" and _gather_dequant(g, node):
            out.append(Finding(name, "Gather", "gather-based dequantization (an nf4 code-table lookup); TensorRT "
                               "has no nf4 type", FOUR_BIT_FIX))
    if entry is not None:
        out += _profile_findings(model, entry)
    return out


def _profile_findings(model, entry: GraphEntry) -> list[Finding]:
    out = []
    for value in model.graph.input:
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if d.dim_param and d.dim_param not in entry.profiles:
                out.append(Finding(value.name, "input", f"dynamic axis {axis} ({d.dim_param!r}) has no optimisation "
                                   f"profile in the manifest", "re-export: every dynamic axis needs min/opt/max"))
            elif d.dim_param:
                lo, opt, hi = entry.profiles[d.dim_param]
                if not 0 <= lo <= opt <= hi:
                    out.append(Finding(value.name, "input", f"profile {d.dim_param}={entry.profiles[d.dim_param]} "
                                       "is not min <= opt <= max", "fix the preset's profile"))
    return out


def lint_graph(root: Path, entry: GraphEntry) -> list[Finding]:
    """Findings for one graph of an export folder."""
    onnx = require("onnx")
    path = safe_relative(root, entry.file, entry.name)
    return lint_model(onnx.load(str(path), load_external_data=False), entry, path.parent)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def refusal(graph: str, findings: list[Finding]) -> str:
    """One line for `build-engine`: the first error, what to change, and how many more there are."""
    bad = errors(findings)
    more = f" (+{len(bad) - 1} more; `lance-deploy verify --json` lists them)" if len(bad) > 1 else ""
    return f"graph {graph} fails the TensorRT lint: {bad[0].line()}{more}"
