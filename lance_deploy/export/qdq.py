"""Quantized Linears (`QLinear`) as ONNX QuantizeLinear / DequantizeLinear, weights stored quantized.

TensorRT's strongly typed builds take every precision from the graph, so a quantized model must
reach ONNX as Q/DQ nodes around plain MatMuls, with the weights kept as int8 / float8 / int4
initializers (not fp32 copies). The TorchScript exporter has no lowering for our packed formats
(and `fake_quantize_*` would store the fp32 weight), so the export goes in three steps:

1. `qdq_swapped` replaces every QLinear by a `QDQExportLinear` for the trace. Its forward is one
   autograd Function: run eagerly it calls the QLinear itself (the traced example and the
   shapes stay exact); its ONNX symbolic emits a single placeholder node
   ``lance_qdq::QLinear(x)`` that only names the QLinear (attributes ``qid`` and the rank of x).
2. The opset-17 trace is converted to opset 21 with onnx's version converter (DequantizeLinear
   ``block_size`` and INT4/UINT4 need 21, float8 needs 19); it passes the placeholders through.
3. `expand_placeholders` replaces each placeholder by standard nodes built from the QLinear's
   packed buffers (`qlinear_subgraph`). Weights are stored transposed,
   [in, out], so each DequantizeLinear feeds its MatMul directly (the pattern TensorRT fuses).

| format        | weight subgraph                                                          |
|---------------|--------------------------------------------------------------------------|
| int8          | DQ(INT8 [in,out], scale [out], axis=1)                                    |
| fp8_e4m3      | DQ(FLOAT8E4M3FN [in,out], scale [out], axis=1)                            |
| int4 asym     | DQ(UINT4 [in,out], scale [in/g,out], UINT4 zero point, axis=0, block_size=g) |
| int4 sym      | DQ(INT4 [in,out] = code - 8, scale [in/g,out], axis=0, block_size=g)     |
| nf4           | DQ(UINT4 indices, 1) -> Cast int64 -> Gather(16-entry code table) x absmax |
| bf16          | Cast(BFLOAT16 [in,out]) to float                                          |

Two targets (``export onnx --target``) differ in the W8A8 activations and the opset:

* ``tensorrt`` (default, what `build-engine` takes): static per-tensor activation scales,
  scale = max(amax / QMAX, 1e-12) from the amax the artifact recorded at quantize time
  (``quant/act_amax.py``): Q(x, scale, zp 0) -> DQ -> MatMul, every scale a positive
  initializer and every zero point an explicit 0 of the quantized type (TensorRT reads the type
  from it; ``export/trt_support.py``). Opset 20, TensorRT 10's documented maximum, unless a
  4-bit weight needs 21 (INT4 and block_size exist only there). The PyTorch reference of such a
  graph is the QLinear with `use_static_activations()` (same scale, same saturation).
* ``onnxruntime``: the dynamic per-token form of `formats.int8/fp8.quantize_activations`:
  absmax over the row, Q(x, scale, axis=0) / DQ with that [n] scale, opset 21 (``output_dtype``).
  ONNX's DynamicQuantizeLinear is uint8 asymmetric per tensor, which is not our math; TensorRT
  refuses run-time scales, so these graphs are for onnxruntime only (the lint says so).

The expansion assumes float32 activations, as every graph `export onnx` writes. onnxruntime must
run these graphs with `ort_runtime.session_options()` (its QDQ fusions change the numerics).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.optional import require
from lance_deploy.export.graph_file import GRAPHS_DIR, OPSET, TARGETS, pin_static_outputs, save_graph, trace_dir
from lance_deploy.export.trt_support import BLOCK_OPSET, MAX_OPSET
from lance_deploy.formats import fp8, int8
from lance_deploy.formats.qlinear import QLinear

if TYPE_CHECKING:
    from lance_deploy.artifact.graph_manifest import GraphEntry
    from lance_deploy.export.parts import GraphJob

DOMAIN = "lance_qdq"
QDQ_OPSET = 21  # onnxruntime target (and TensorRT graphs with 4-bit weights)
IR_VERSIONS = {20: 9, 21: 10}  # the IR version that introduced each opset (10: INT4/UINT4)
FOUR_BIT = ("int4", "nf4")


def qdq_opset(registry, target: str) -> int:
    """The opset of a Q/DQ graph: 21 for onnxruntime; for TensorRT its documented 20 unless a
    4-bit weight needs 21."""
    if target not in TARGETS:
        raise LanceUsageError(f"--target {target!r} is unknown; choose from {', '.join(TARGETS)}")
    if target == "onnxruntime" or any(q.spec.name in FOUR_BIT for _, q in registry):
        return BLOCK_OPSET
    return MAX_OPSET


def static_activations(module: nn.Module, where: str) -> None:
    """Switch every W8A8 QLinear of `module` to its calibrated static per-tensor scale (in place)."""
    for path, q in quantized_linears(module).items():
        if q.spec.activations is None:
            continue
        if q.act_amax is None:
            raise LanceUsageError(f"{where}: {path} ({q.spec.label}) has no calibrated activation amax, which "
                                  "--target tensorrt needs for static scales; re-quantize with a recipe that has a "
                                  "calibration section, or export with --target onnxruntime (dynamic scales)")
        q.use_static_activations()


class _Ref:
    """Carries the QLinear into the Function as a plain Python argument (the symbolic reads it too)."""

    __slots__ = ("q",)

    def __init__(self, q: QLinear):
        self.q = q


class _QLinearOp(torch.autograd.Function):
    """Eager: the QLinear's own forward. ONNX: one ``lance_qdq::QLinear`` placeholder node."""

    @staticmethod
    def forward(ctx, x: Tensor, ref: _Ref, qid: int) -> Tensor:
        return ref.q.forward(x)  # not __call__: no tracer scope for a module outside the trace

    @staticmethod
    def symbolic(g, x, ref: _Ref, qid: int):
        from torch.onnx import symbolic_helper

        sizes = symbolic_helper._get_tensor_sizes(x)
        # rank 0 = unknown: the expansion then flattens to 2-D wherever it needs rows
        out = g.op(f"{DOMAIN}::QLinear", x, qid_i=qid, rank_i=0 if sizes is None else len(sizes))
        if sizes is not None:  # downstream reshapes of the trace need the output shape
            out.setType(x.type().with_sizes(sizes[:-1] + [ref.q.out_features]))
        return out


class QDQExportLinear(nn.Module):
    """Stands in for a QLinear while tracing; `qid` indexes the registry of `qdq_swapped`.

    The QLinear is held through `_Ref`, not as a submodule: its buffers must not become graph
    initializers of their own (the expansion writes the ONNX-layout copies), and the tracer
    cannot look up a submodule that is called from inside an autograd Function.
    """

    def __init__(self, q: QLinear, qid: int):
        super().__init__()
        self.ref, self.qid = _Ref(q), qid

    def forward(self, x: Tensor) -> Tensor:
        return _QLinearOp.apply(x, self.ref, self.qid)


def quantized_linears(module: nn.Module) -> dict[str, QLinear]:
    """Module path -> QLinear for every QLinear inside `module`."""
    return {name: m for name, m in module.named_modules() if isinstance(m, QLinear)}


@contextmanager
def qdq_swapped(module: nn.Module):
    """Swap every QLinear in `module` for a `QDQExportLinear` (restored on exit).

    Yields the registry [(path, QLinear)] indexed by qid. The swap is in place and shares the
    buffers (no copies), so even a full-size layer is swapped for free.
    """
    registry, swaps = [], []
    for path, q in quantized_linears(module).items():
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        parent._modules[name] = QDQExportLinear(q, len(registry))
        registry.append((path, q))
        swaps.append((parent, name, q))
    try:
        yield registry
    finally:
        for parent, name, q in swaps:
            parent._modules[name] = q


def formats_of(registry) -> dict[str, str]:
    """Module path -> format label (for the manifest's meta)."""
    return {path: q.spec.label for path, q in registry}


def upgrade_opset(model, opset: int = QDQ_OPSET):
    """The opset-17 trace -> `opset` (placeholders pass through), at that opset's IR version."""
    onnx = require("onnx")
    from onnx import version_converter

    model = version_converter.convert_version(model, opset)
    model.ir_version = IR_VERSIONS[opset]
    # The converter does not know our domain; keep its import until the placeholders are gone.
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model


def expand_placeholders(model, registry, target: str = "onnxruntime") -> None:
    """Replace every ``lance_qdq::QLinear`` node by standard Q/DQ nodes for `target`, in place."""
    nodes = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        path, q = registry[attrs["qid"]]
        new_nodes, inits = qlinear_subgraph(q, path, node.input[0], node.output[0], attrs["rank"], target)
        nodes += new_nodes
        model.graph.initializer.extend(inits)
    del model.graph.node[:]
    model.graph.node.extend(nodes)  # each expansion sits where its placeholder was: still sorted
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if target == "tensorrt":
        share_input_quantization(model)


def share_input_quantization(model) -> int:
    """One Q -> DQ per quantized tensor: q/k/v (and gate/up) each expand their own static Q/DQ of the
    same input with the same scale, which compute identical values; keep the first, point the other
    MatMuls at it, drop the rest (and their now unused constants). Returns how many pairs were dropped."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    users: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    first, rename, drop = {}, {}, set()
    for q in nodes:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits or len(q.input) < 3:
            continue
        dq = users.get(q.output[0], [])
        if len(dq) != 1 or dq[0].op_type != "DequantizeLinear" or list(dq[0].input[1:]) != list(q.input[1:]):
            continue
        key = (q.input[0], numpy_helper.to_array(inits[q.input[1]]).tobytes(), inits[q.input[2]].data_type)
        if key in first:
            rename[dq[0].output[0]], drop = first[key], drop | {id(q), id(dq[0])}
        else:
            first[key] = dq[0].output[0]
    kept = [n for n in nodes if id(n) not in drop]
    for n in kept:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    used = {i for n in kept for i in n.input}
    del model.graph.node[:]
    model.graph.node.extend(kept)
    live = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    return len(drop) // 2


def quantized_bytes(registry) -> int:
    """Bytes of the packed weights (qdata, scale, zero point, smooth) plus biases."""
    total = 0
    for _, q in registry:
        total += q.packed.nbytes + (0 if q.bias is None else q.bias.numel() * 4)
    return total


def export_qdq_graph(job: GraphJob, root: Path, preset: str, *, target: str) -> GraphEntry:
    """Like `onnx_export.export_graph`, for a job whose module holds QLinears.

    Writes root/graphs/<name>.onnx (+ .onnx.data) with Q/DQ nodes and quantized initializers for
    `target` (see the module docstring); the entry's meta records the opset, the target, each
    Linear's format and, for static scales, each W8A8 Linear's activation amax.
    """
    import warnings

    onnx = require("onnx")

    (root / GRAPHS_DIR).mkdir(parents=True, exist_ok=True)
    if target == "tensorrt":
        static_activations(job.module, f"graph {job.name}")
    with trace_dir(job, root) as raw_dir:
        with qdq_swapped(job.module) as registry:
            if not registry:
                raise ValueError(f"graph {job.name}: no QLinear to export as Q/DQ (use export_graph)")
            opset = qdq_opset(registry, target)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer chatter; numerics are checked by the tests
                torch.onnx.export(job.module, job.args, str(raw_dir / "model.onnx"), input_names=job.input_names,
                                  output_names=job.output_names, dynamic_axes=job.dynamic_axes or None,
                                  opset_version=OPSET, do_constant_folding=True, dynamo=False,
                                  custom_opsets={DOMAIN: 1})
            model = upgrade_opset(onnx.load(str(raw_dir / "model.onnx")), opset)
            expand_placeholders(model, registry, target)
            pin_static_outputs(model, job)
            formats, packed = formats_of(registry), quantized_bytes(registry)
            amax = {p: q.act_amax for p, q in registry if q.static_activations}
        meta = dict(job.meta, opset=opset, exporter="torchscript", target=target, quantized=formats,
                    packed_weight_bytes=packed)
        if amax:
            meta["activation_amax"] = amax
        return save_graph(model, job, root, preset, meta)


# ---------------------------------------------------------------------- node builders


class _Builder:
    """Nodes and initializers of one expansion; every name is prefixed by the Linear's path."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits = prefix, [], []

    def raw(self, name: str, data_type: int, dims, data: bytes) -> str:
        from onnx import TensorProto

        t = TensorProto(name=f"{self.prefix}.{name}", data_type=data_type, dims=list(dims), raw_data=data)
        self.inits.append(t)
        return t.name

    def tensor(self, name: str, data_type: int, t: Tensor) -> str:
        """A torch tensor's bytes as an initializer of ONNX type `data_type` (same element size)."""
        t = t.detach().cpu().contiguous()
        return self.raw(name, data_type, t.shape, t.view(torch.uint8).numpy().tobytes())

    def array(self, name: str, a) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), f"{self.prefix}.{name}"))
        return self.inits[-1].name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        name = f"{self.prefix}/{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}_out"], name=name, **attrs))
        return self.nodes[-1].output[0]


def _pack4(codes: Tensor) -> bytes:
    """4-bit values (uint 0..15 or int -8..7), row-major -> ONNX INT4/UINT4 raw data.

    ONNX packs two elements per byte, the first in the low nibble (the same order as our int4
    `pack_nibbles`); an odd count is padded with a zero nibble.
    """
    flat = (codes.to(torch.int16).flatten() & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).numpy().tobytes()


def _zeros(b: _Builder, name: str, data_type: int, shape) -> str:
    """An explicit zero point of `data_type` (TensorRT takes the quantized type from it)."""
    from onnx import TensorProto as TP

    n = int(np.prod(shape)) if len(shape) else 1
    nbytes = (n + 1) // 2 if data_type in (TP.INT4, TP.UINT4) else n  # 1-byte types, or 2 nibbles a byte
    return b.raw(name, data_type, shape, bytes(nbytes))


def _weight(b: _Builder, q: QLinear, explicit_zero: bool) -> str:
    """The float [in, out] weight, as DequantizeLinear (or the nf4 lookup) of the stored codes."""
    from onnx import TensorProto as TP

    from lance_deploy.formats.int4 import SYM_ZERO, unpack_nibbles
    from lance_deploy.formats.nf4 import code_table

    p, name = q.packed, q.spec.name
    if name in ("int8", "fp8_e4m3"):
        code = TP.INT8 if name == "int8" else TP.FLOAT8E4M3FN
        inputs = [b.tensor("weight_q", code, p.qdata.t()), b.array("weight_scale", p.scale.float().reshape(-1).numpy())]
        if explicit_zero:
            inputs.append(_zeros(b, "weight_zero_point", code, (q.out_features,)))
        return b.op("DequantizeLinear", inputs, axis=1)
    if name == "bf16":
        return b.op("Cast", [b.tensor("weight", TP.BFLOAT16, p.qdata.t())], to=TP.FLOAT)
    inn, out, g = q.in_features, q.out_features, p.spec.group_size
    scale = p.scale.float().t().contiguous()  # [in/g, out]: blocks run along the input axis
    if name == "int4":
        codes = unpack_nibbles(p.qdata).t()  # [in, out]
        if p.zero_point is None:  # symmetric: implicit zero point 8 -> signed INT4, no zero point
            w = b.raw("weight_q", TP.INT4, (inn, out), _pack4(codes.to(torch.int16) - SYM_ZERO))
            inputs = [w, b.array("weight_scale", scale.numpy())]
            if explicit_zero:
                inputs.append(_zeros(b, "weight_zero_point", TP.INT4, (inn // g, out)))
        else:
            w = b.raw("weight_q", TP.UINT4, (inn, out), _pack4(codes))
            zp = b.raw("weight_zero_point", TP.UINT4, (inn // g, out), _pack4(p.zero_point.t()))
            inputs = [w, b.array("weight_scale", scale.numpy()), zp]
        return b.op("DequantizeLinear", inputs, axis=0, block_size=g)
    # nf4: HIGH nibble = even column (bitsandbytes order); look the indices up in the code table.
    idx = torch.stack([p.qdata >> 4, p.qdata & 0xF], dim=-1).reshape(out, inn).t()
    one = b.array("one", np.array(1.0, np.float32))
    fidx = b.op("DequantizeLinear", [b.raw("weight_idx", TP.UINT4, (inn, out), _pack4(idx)), one])
    values = b.op("Gather", [b.array("code", code_table().numpy()), b.op("Cast", [fidx], to=TP.INT64)])
    blocks = b.op("Reshape", [values, b.array("block_shape", np.array([inn // g, g, out], np.int64))])
    scaled = b.op("Mul", [blocks, b.array("absmax", scale.reshape(inn // g, 1, out).numpy())])
    return b.op("Reshape", [scaled, b.array("weight_shape", np.array([inn, out], np.int64))])


def _quantize_activations(b: _Builder, x: str, q: QLinear) -> str:
    """Per-token symmetric Q -> DQ of 2-D x [n, in], as `formats.{int8,fp8}.quantize_activations`."""
    from onnx import TensorProto as TP

    from lance_deploy.formats import fp8, int8

    qmax, to = (int8.QMAX, TP.INT8) if q.spec.name == "int8" else (fp8.FP8_MAX, TP.FLOAT8E4M3FN)
    absmax = b.op("ReduceMax", [b.op("Abs", [x]), b.array("axes", np.array([-1], np.int64))], keepdims=1)
    scale = b.op("Max", [b.op("Div", [absmax, b.array("qmax", np.array(qmax, np.float32))]),
                         b.array("tiny", np.array(1e-12, np.float32))])  # same floor as the reference
    scale = b.op("Reshape", [scale, b.array("flat", np.array([-1], np.int64))])  # [n]: one per row (axis 0)
    # QuantizeLinear rounds half to even and saturates, like torch.round / the fp8 cast after clamp.
    xq = b.op("QuantizeLinear", [x, scale], axis=0, output_dtype=to)
    return b.op("DequantizeLinear", [xq, scale], axis=0)


def _static_activations(b: _Builder, x: str, q: QLinear) -> str:
    """Per-tensor Q -> DQ of x (any rank) with the calibrated scale, as `QLinear.use_static_activations`."""
    from onnx import TensorProto as TP

    fmt, to = (int8, TP.INT8) if q.spec.name == "int8" else (fp8, TP.FLOAT8E4M3FN)
    scale = b.array("input_scale", fmt.static_scale(q.act_amax).numpy())
    zero = _zeros(b, "input_zero_point", to, ())
    return b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale, zero]), scale, zero])


def qlinear_subgraph(q: QLinear, path: str, x: str, y: str, rank: int, target: str = "onnxruntime"):
    """(nodes, initializers) computing y = QLinear(x) with standard ONNX ops for `target`."""
    b = _Builder(path)
    if q.smooth is not None:  # AWQ / SmoothQuant runtime divisor, applied before any quantization
        x = b.op("Div", [x, b.array("smooth", q.smooth.float().numpy())])
    if target == "tensorrt":
        if q.spec.activations is not None:
            x = _static_activations(b, x, q)
        out = b.op("MatMul", [x, _weight(b, q, explicit_zero=True)])  # N-D x 2-D: no flattening needed
        if q.bias is not None:
            out = b.op("Add", [out, b.array("bias", q.bias.float().numpy())])
        b.nodes[-1].output[0] = y
        return b.nodes, b.inits
    lead = None
    if q.spec.activations is not None and rank != 2:
        # Per-token scales need rows: flatten [..., in] to [n, in], restore the lead dims after.
        lead = b.op("Slice", [b.op("Shape", [x]), b.array("start", np.array([0], np.int64)),
                              b.array("stop", np.array([-1], np.int64))])
        x = b.op("Reshape", [x, b.array("rows", np.array([-1, q.in_features], np.int64))])
    if q.spec.activations is not None:
        x = _quantize_activations(b, x, q)
    out = b.op("MatMul", [x, _weight(b, q, explicit_zero=False)])
    if q.bias is not None:
        out = b.op("Add", [out, b.array("bias", q.bias.float().numpy())])
    if lead is not None:
        shape = b.op("Concat", [lead, b.array("out", np.array([q.out_features], np.int64))], axis=0)
        out = b.op("Reshape", [out, shape])
    b.nodes[-1].output[0] = y  # the last node writes the placeholder's output name
    return b.nodes, b.inits
