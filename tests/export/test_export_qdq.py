"""Quantized layers exported as ONNX Q/DQ graphs match the quantized PyTorch layer in onnxruntime.

Each case quantizes every Linear of one golden tiny MoT layer (both experts) with
`QLinear.from_linear(linear, quantize_rtn(w, spec))`, one of them with an AWQ-style runtime
`smooth` divisor, exports it with `export_qdq_graph` and checks: Q/DQ nodes are really there,
the weights are stored quantized (types and bytes), and onnxruntime's output equals the
QLinear layer's within rel 1e-3 at two token counts (the dynamic axes). CPU, ~20 s.
"""

from __future__ import annotations

import pytest
import torch

from golden_data import GOLDEN

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lance_deploy.formats import FormatSpec, quantize_rtn
from lance_deploy.formats.qlinear import QLinear

CKPT = GOLDEN / "ckpt" / "Lance_3B"
pytestmark = pytest.mark.skipif(not CKPT.is_dir(), reason=f"golden checkpoint not found at {CKPT}")
W8A8 = "dynamic_per_token"
TP = onnx.TensorProto
CASES = {  # spec, ONNX type of the stored weight codes
    "int8": (FormatSpec("int8"), TP.INT8),
    "int8_w8a8": (FormatSpec("int8", activations=W8A8), TP.INT8),
    "fp8": (FormatSpec("fp8_e4m3"), TP.FLOAT8E4M3FN),
    "fp8_w8a8": (FormatSpec("fp8_e4m3", activations=W8A8), TP.FLOAT8E4M3FN),
    "int4_g64": (FormatSpec("int4", group_size=64), TP.UINT4),
    "int4_g64_sym": (FormatSpec("int4", group_size=64, symmetric=True), TP.INT4),
    "nf4": (FormatSpec("nf4"), TP.UINT4),
}
SIZES = ((18, 8), (41, 23))  # (n, Lc): the traced size and another one


@pytest.fixture(scope="module")
def source():
    from lance_deploy.export.sources import open_source

    return open_source(CKPT)


def _quantize(module: torch.nn.Module, spec: FormatSpec) -> int:
    """Replace every nn.Linear by an RTN QLinear; the gen MLP's down_proj also gets a smooth divisor."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                packed = quantize_rtn(child.weight, spec)
                if parent is getattr(module, "mlp_moe_gen", None) and name == "down_proj":
                    smooth = torch.rand(child.in_features, generator=torch.Generator().manual_seed(5)) + 0.5
                    packed = packed.with_smooth(smooth)
                setattr(parent, name, QLinear.from_linear(child, packed))
                count += 1
    return count


def _export(graph, args, axes, root, name="gen-layer.01"):
    from lance_deploy.export.parts import GraphJob
    from lance_deploy.export.qdq import export_qdq_graph

    job = GraphJob(name, name.split(".")[0], graph, args, list(graph.input_names), list(graph.output_names), axes)
    entry = export_qdq_graph(job, root, "image_256res", target="onnxruntime")
    return entry, root / entry.file


def _session(path):
    from lance_deploy.runtime.graphs import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_gen_layer_matches_qlinear_layer(case, source, tmp_path):
    from lance_deploy.export.graphs import GenLayerGraph
    from lance_deploy.export.parts import LAYER_AXES, layer_inputs
    from lance_deploy.export.qdq import DOMAIN, QDQ_OPSET, quantized_bytes, quantized_linears
    from lance_deploy.export.reference import kv_cache
    from lance_deploy.export.tensorrt_build import has_qdq
    from lance_deploy.model.mot import Routing

    spec, code_type = CASES[case]
    layer = source.layer(1, with_gen=True)
    fp32_linear_bytes = sum(m.weight.numel() * 4 for m in layer.modules() if isinstance(m, torch.nn.Linear))
    n_linear = _quantize(layer, spec)
    entry, path = _export(GenLayerGraph(layer), layer_inputs(source, 18, 8, seed=1), dict(LAYER_AXES), tmp_path)

    # The graph: standard Q/DQ at opset 21, no placeholder left, one weight DQ per Linear.
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert not [n for n in model.graph.node if n.domain == DOMAIN]
    assert {o.domain: o.version for o in model.opset_import} == {"": QDQ_OPSET}
    assert ops.count("DequantizeLinear") == n_linear * (2 if spec.activations else 1)
    assert ops.count("QuantizeLinear") == (n_linear if spec.activations else 0)
    assert has_qdq(path) and entry.meta["quantized"]["layer.mlp_moe_gen.down_proj"] == spec.label

    # The weights are stored quantized: typed codes, and about the packed bytes in total.
    codes = [i for i in model.graph.initializer if i.name.endswith(("weight_q", "weight_idx"))]
    assert len(codes) == n_linear and {i.data_type for i in codes} == {code_type}
    stored = sum(len(i.raw_data) or onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    other = sum(p.numel() * 4 for n, p in layer.named_parameters())  # norms (every Linear is a QLinear now)
    packed = quantized_bytes(quantized_linears(layer).items())
    assert stored <= packed + other + 4096, (stored, packed, other)  # + small constants (shapes, code table)
    assert stored < 0.3 * fp32_linear_bytes + other + 4096
    assert sum((tmp_path / f).stat().st_size for f in entry.files()) < 0.45 * fp32_linear_bytes + 80_000

    # The numerics: onnxruntime vs the QLinear layer, at the traced size and another one.
    session = _session(path)
    for n, lc in SIZES:
        x, cos, sin, pk, pv = layer_inputs(source, n, lc, seed=100 + n)
        with torch.no_grad():
            ref = layer(x, (cos, sin), Routing.of(n, torch.arange(1, n - 1)), kv_cache(source, 1, pk, pv),
                        False, False)
        (got,) = session.run(None, dict(hidden=x.numpy(), cos=cos.numpy(), sin=sin.numpy(), past_key=pk.numpy(),
                                        past_value=pv.numpy()))
        assert got.shape == (n, 64) and _rel(got, ref) <= 1e-3, (case, n, _rel(got, ref))


def test_quantized_und_layer_with_kv_outputs(source, tmp_path):
    from lance_deploy.export.graphs import UndLayerGraph
    from lance_deploy.export.parts import UND_LAYER_AXES, layer_inputs
    from lance_deploy.export.reference import kv_cache
    from lance_deploy.model.mot import Routing

    layer = source.layer(0, with_gen=False)
    _quantize(layer, FormatSpec("int8", activations=W8A8))
    axes = dict(UND_LAYER_AXES)
    args = (*layer_inputs(source, 18, 8, seed=0), torch.tensor([True]))
    _, path = _export(UndLayerGraph(layer), args, axes, tmp_path, name="und-layer.00")
    x, cos, sin, pk, pv = layer_inputs(source, 9, 5, seed=3)
    cache = kv_cache(source, 0, pk, pv)
    with torch.no_grad():
        ref = layer(x, (cos, sin), Routing(), cache, True, True)
    h, k, v = _session(path).run(None, dict(hidden=x.numpy(), cos=cos.numpy(), sin=sin.numpy(), past_key=pk.numpy(),
                                            past_value=pv.numpy(), causal=torch.tensor([True]).numpy()))
    assert _rel(h, ref) <= 1e-3 and _rel(k, cache.keys[0]) <= 1e-3 and _rel(v, cache.values[0]) <= 1e-3


class _Seq(torch.nn.Module):
    input_names, output_names = ("x",), ("y",)

    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, x):
        return self.q(x)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_w8a8_on_3d_input_quantizes_per_token(fmt, tmp_path):
    """Rank-3 activations are flattened to rows for the per-token scales and reshaped back."""
    lin = torch.nn.Linear(128, 48)
    with torch.no_grad():
        q = QLinear.from_linear(lin, quantize_rtn(lin.weight, FormatSpec(fmt, activations=W8A8)))
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 1, 5)[:, None]
    _, path = _export(_Seq(q), (x,), {"x": {1: "n"}, "y": {1: "n"}}, tmp_path, name="gen-layer.00")
    for xs in (x, torch.randn(2, 9, 128)):
        with torch.no_grad():
            ref = q(xs)
        (got,) = _session(path).run(None, {"x": xs.numpy()})
        assert got.shape == tuple(ref.shape) and _rel(got, ref) <= 1e-5


def test_a_module_without_qlinear_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no QLinear"):
        _export(_Seq(torch.nn.Linear(4, 4)), (torch.randn(2, 4),), {}, tmp_path, name="gen-layer.00")


def test_swap_is_undone(source):
    from lance_deploy.export.qdq import QDQExportLinear, qdq_swapped

    layer = source.layer(0, with_gen=False)
    _quantize(layer, FormatSpec("int8"))
    with qdq_swapped(layer) as registry:
        assert len(registry) == 7 and isinstance(layer.mlp.up_proj, QDQExportLinear)
    assert isinstance(layer.mlp.up_proj, QLinear) and not any(isinstance(m, QDQExportLinear) for m in layer.modules())
