"""`--target tensorrt` Q/DQ graphs: static calibrated activation scales, and the TensorRT lint.

A golden tiny gen layer gets RTN W8A8 QLinears (the gen MLP's down_proj with a runtime smooth
divisor) and per-tensor input amax observed on random layer inputs, as quantize records it. Its
tensorrt graph must hold only constant, positive scales and zero points of 0, pass the lint and
match the QLinear layer with the same static scales in onnxruntime (rel <= 1e-5); the dynamic
(onnxruntime-target) and nf4 graphs must fail the lint, naming their nodes, and build-engine
must refuse them before it looks for TensorRT. CPU, ~40 s.
"""

from __future__ import annotations

import json

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
CASES = {"int8": (FormatSpec("int8", activations=W8A8), "max"),
         "fp8": (FormatSpec("fp8_e4m3", activations=W8A8), "percentile")}
SIZES = ((18, 8), (41, 23))


@pytest.fixture(scope="module")
def source():
    from lance_deploy.export.sources import open_source

    return open_source(CKPT)


def _quantized_layer(source, spec: FormatSpec, amax_method: str | None):
    """Layer 1 with every Linear an RTN QLinear; W8A8 ones get an observed static amax."""
    from lance_deploy.export.parts import layer_inputs
    from lance_deploy.export.reference import kv_cache
    from lance_deploy.model.mot import Routing
    from lance_deploy.quant.act_amax import install_amax, observe_w8a8_inputs

    layer = source.layer(1, with_gen=True)
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                packed = quantize_rtn(child.weight, spec)
                if parent is layer.mlp_moe_gen and name == "down_proj":
                    packed = packed.with_smooth(torch.rand(child.in_features, generator=torch.Generator()
                                                           .manual_seed(5)) + 0.5)
                setattr(parent, name, QLinear.from_linear(child, packed))
    if amax_method is not None:
        observers, handles = observe_w8a8_inputs(layer)
        for seed, (n, lc) in enumerate(((30, 12), (9, 4))):
            x, cos, sin, pk, pv = layer_inputs(source, n, lc, seed=50 + seed)
            with torch.no_grad():
                layer(x, (cos, sin), Routing.of(n, torch.arange(1, n - 1)), kv_cache(source, 1, pk, pv), False, False)
        for h in handles:
            h.remove()
        install_amax(layer, {p: o.value(amax_method, 99.9) for p, o in observers.items()})
    return layer


def _export(layer, source, root, target):
    from lance_deploy.export.graphs import GenLayerGraph
    from lance_deploy.export.parts import LAYER_AXES, GraphJob, layer_inputs
    from lance_deploy.export.qdq import export_qdq_graph

    graph = GenLayerGraph(layer)
    job = GraphJob("gen-layer.01", "gen-layer", graph, layer_inputs(source, 18, 8, seed=1), list(graph.input_names),
                   list(graph.output_names), dict(LAYER_AXES), {"n": [3, 18, 64], "Lc": [1, 8, 64]}, {"layer": 1})
    entry = export_qdq_graph(job, root, "image_256res", target=target)
    return entry, root / entry.file


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


def _qdq_constants(model):
    """(scales, zero points) of every Q/DQ node as numpy arrays; fails if one is not an initializer."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    scales, zeros = [], []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        assert len(n.input) == 3 and n.input[1] in inits and n.input[2] in inits, n.name
        scales.append(numpy_helper.to_array(inits[n.input[1]]))
        zeros.append(numpy_helper.to_array(inits[n.input[2]]))
    return scales, zeros


@pytest.mark.parametrize("case", list(CASES))
def test_tensorrt_graph_has_static_scales_and_matches_static_layer(case, source, tmp_path):
    from lance_deploy.export.parts import layer_inputs
    from lance_deploy.export.reference import kv_cache
    from lance_deploy.export.trt_lint import errors, lint_graph
    from lance_deploy.model.mot import Routing
    from lance_deploy.runtime.graphs import session_options

    spec, method = CASES[case]
    layer = _quantized_layer(source, spec, method)
    entry, path = _export(layer, source, tmp_path, "tensorrt")
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import} == {"": 20} and model.ir_version == 9
    ops = [n.op_type for n in model.graph.node]
    # 14 weight DQs; one Q/DQ per quantized tensor: q/k/v and gate/up share theirs (8 inputs in all)
    assert ops.count("QuantizeLinear") == 8 and ops.count("DequantizeLinear") == 22
    assert "ReduceMax" not in ops  # no run-time scale computation left
    scales, zeros = _qdq_constants(model)
    assert all((s > 0).all() for s in scales) and all((z.astype(float) == 0).all() for z in zeros)
    q_scales = [s for n, s in zip([n for n in model.graph.node if n.op_type in ("QuantizeLinear",
                                                                                 "DequantizeLinear")], scales)
                if n.op_type == "QuantizeLinear"]
    assert all(s.size == 1 for s in q_scales)  # per-tensor activations
    assert set(entry.meta["activation_amax"]) == {f"layer.{p}" for p, m in layer.named_modules() if isinstance(m, QLinear)}
    assert not errors(lint_graph(tmp_path, entry)), lint_graph(tmp_path, entry)

    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    for n, lc in SIZES:
        x, cos, sin, pk, pv = layer_inputs(source, n, lc, seed=100 + n)  # held-out: may exceed the amax (clips)
        args = (x, (cos, sin), Routing.of(n, torch.arange(1, n - 1)))
        with torch.no_grad():
            ref = layer(*args, kv_cache(source, 1, pk, pv), False, False)  # the export switched it to static
            for m in layer.modules():
                if isinstance(m, QLinear):
                    m.use_static_activations(False)
            dynamic = layer(*args, kv_cache(source, 1, pk, pv), False, False)
            for m in layer.modules():
                if isinstance(m, QLinear):
                    m.use_static_activations(True)
        (got,) = session.run(None, {"hidden": x.numpy(), "cos": cos.numpy(), "sin": sin.numpy(),
                                    "past_key": pk.numpy(), "past_value": pv.numpy()})
        assert _rel(got, ref) <= 1e-5, (case, n, _rel(got, ref))
        assert _rel(got, dynamic) > 1e-4  # the reference really is the static form, not the per-token one


def test_lint_names_the_nodes_of_a_dynamic_scale_graph(source, tmp_path):
    from lance_deploy.export.trt_lint import errors, lint_graph

    entry, _ = _export(_quantized_layer(source, CASES["int8"][0], None), source, tmp_path, "onnxruntime")
    bad = errors(lint_graph(tmp_path, entry))
    dynamic = [f for f in bad if "computed at run time" in f.problem]
    assert dynamic and all(f.op in ("QuantizeLinear", "DequantizeLinear") for f in dynamic)
    assert any(f.node.startswith("layer.self_attn.q_proj_moe_gen/QuantizeLinear") for f in dynamic)
    assert any(f.node == "<model>" and "opset 21" in f.problem for f in bad)
    assert all("--target tensorrt" in f.fix for f in dynamic)


def test_w8a8_without_amax_is_refused_for_tensorrt(source, tmp_path):
    from lance_deploy.core.errors import LanceUsageError

    layer = _quantized_layer(source, CASES["fp8"][0], None)
    with pytest.raises(LanceUsageError, match=r"has no calibrated activation amax.*--target onnxruntime"):
        _export(layer, source, tmp_path, "tensorrt")


def _export_folder(tmp_path, entry):
    from lance_deploy.artifact.graph_manifest import Manifest, write_manifest

    write_manifest(tmp_path, Manifest(producer={"name": "lance-deploy"}, source={"files": []},
                                      request={"target": "tensorrt"}, parts=[entry]))


def test_nf4_for_tensorrt_fails_the_lint_and_build_engine_refuses(source, tmp_path):
    from lance_deploy.core.errors import LanceUsageError
    from lance_deploy.export.tensorrt_build import EngineRequest, build_engines
    from lance_deploy.export.trt_lint import errors, lint_graph

    entry, _ = _export(_quantized_layer(source, FormatSpec("nf4"), None), source, tmp_path, "tensorrt")
    assert entry.meta["opset"] == 21  # 4-bit weights need opset 21 even for TensorRT
    bad = errors(lint_graph(tmp_path, entry))
    gathers = [f for f in bad if f.op == "Gather"]
    assert len(gathers) == 14 and all("nf4" in f.problem and "int4" in f.fix for f in gathers)
    assert any(f.op == "DequantizeLinear" and "UINT4" in f.problem for f in bad)
    _export_folder(tmp_path, entry)
    with pytest.raises(LanceUsageError, match=r"graph gen-layer\.01 fails the TensorRT lint: node layer\.\S+ "
                                              r"\(DequantizeLinear|Gather\)"):
        build_engines(EngineRequest(root=tmp_path, precision="int8"))


def test_symmetric_int4_is_linted_as_supported_with_an_opset_note(source, tmp_path):
    from lance_deploy.export.trt_lint import errors, lint_graph

    entry, _ = _export(_quantized_layer(source, FormatSpec("int4", group_size=32, symmetric=True), None), source,
                       tmp_path, "tensorrt")
    findings = lint_graph(tmp_path, entry)
    assert not errors(findings), [f.line() for f in errors(findings)]
    assert [f.severity for f in findings] == ["note"] and "INT4" in findings[0].problem
    asym, _ = _export(_quantized_layer(source, FormatSpec("int4", group_size=32), None), source, tmp_path / "a",
                      "tensorrt")
    assert any("symmetric" in f.fix for f in errors(lint_graph(tmp_path / "a", asym)))


def test_lint_requires_a_profile_for_every_dynamic_axis(source, tmp_path):
    from dataclasses import replace

    from lance_deploy.export.trt_lint import errors, lint_graph

    layer = _quantized_layer(source, CASES["int8"][0], "max")
    entry, _ = _export(layer, source, tmp_path, "tensorrt")
    bad = errors(lint_graph(tmp_path, replace(entry, profiles={"n": [3, 18, 64]})))
    assert {f.node for f in bad} == {"past_key", "past_value"} and all("'Lc'" in f.problem for f in bad)


def test_amax_observer_max_and_percentile():
    from lance_deploy.quant.act_amax import AmaxObserver

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(500, 64, generator=g) * s for s in (1.0, 3.0, 0.5)]
    obs = AmaxObserver()
    for x in xs:
        obs.update(x)
    a = torch.cat(xs).abs().flatten().double()
    assert obs.value("max", 99.9) == pytest.approx(float(a.max()))
    v = obs.value("percentile", 99.9)  # the right edge of the first bin where the CDF reaches 99.9 %
    assert float((a <= v).double().mean()) >= 0.999 >= float((a <= v - obs.width).double().mean()) - 1e-9
    assert v < 0.7 * obs.value("max", 99.9)


def test_manifest_records_activation_amax_only_for_w8a8(tmp_path):
    from lance_deploy.artifact.manifest import ArtifactError, ArtifactManifest
    from lance_deploy.artifact.writer import ArtifactWriter

    w = torch.randn(32, 64)
    writer = ArtifactWriter(tmp_path / "a")
    writer.add("blk.0.gen.attn_o", quantize_rtn(w, FormatSpec("int8", activations=W8A8)), activation_amax=2.5)
    with pytest.raises(ArtifactError, match="only recorded for W8A8"):
        writer.add("blk.0.gen.ffn_down", quantize_rtn(torch.randn(64, 128), FormatSpec("int8")), activation_amax=1.0)
    writer.add("blk.0.gen.ffn_down", quantize_rtn(torch.randn(64, 128), FormatSpec("int8")))
    manifest = writer.seal(source={}, recipe={})
    rec = {t.name: t for t in manifest.tensors}
    assert rec["blk.0.gen.attn_o"].activation_amax == 2.5 and rec["blk.0.gen.ffn_down"].activation_amax is None
    d = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "activation_amax" not in next(t for t in d["tensors"] if t["name"] == "blk.0.gen.ffn_down")
    down = next(t for t in d["tensors"] if t["name"] == "blk.0.gen.ffn_down")
    down["activation_amax"] = 1.0
    with pytest.raises(ArtifactError, match="only a W8A8 weight"):
        ArtifactManifest.from_dict(d)


@pytest.mark.slow
def test_quantize_records_amax_and_tensorrt_export_verifies(tmp_path):
    """quantize (W8A8, calibrated) -> manifest amax -> export --target tensorrt -> verify with the lint enforced."""
    import dataclasses

    from click.testing import CliRunner

    from lance_deploy.artifact.graph_manifest import load_manifest
    from lance_deploy.artifact.reader import ArtifactReader
    from lance_deploy.cli.export_cmd import export_group, verify_cmd
    from lance_deploy.quant.quantize import quantize
    from lance_deploy.quant.recipe import load_recipe

    recipe = load_recipe("int8-ampere")  # gen expert int8 W8A8 SmoothQuant, und int8 weight-only
    calib = dataclasses.replace(recipe.calibration, tasks=("t2i",), samples_per_task=1, steps=3, height=32, width=32,
                                activation_amax="percentile")
    art = tmp_path / "int8"
    quantize(CKPT, recipe.replace(calibration=calib), art, progress=False)
    amax = {t.name: t.activation_amax for t in ArtifactReader(art).manifest.tensors if t.activation_amax is not None}
    assert set(amax) == {f"blk.{i}.gen.{leaf}" for i in range(2) for leaf in ("attn_q", "attn_k", "attn_v", "attn_o",
                                                                             "ffn_gate", "ffn_up", "ffn_down")}
    assert amax["blk.0.gen.attn_q"] == amax["blk.0.gen.attn_v"] > 0  # one input, one amax
    out = tmp_path / "trt"
    r = CliRunner().invoke(export_group, ["onnx", "--model", str(art), "--part", "gen-layer", "--preset",
                                          "image_256res", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(verify_cmd, [str(out)])
    assert r.exit_code == 0 and "TensorRT lint ok" in r.output, r.output
    entry = load_manifest(out).parts[0]
    assert entry.meta["target"] == "tensorrt" and entry.meta["opset"] == 20
    assert entry.meta["activation_amax"]["layer.self_attn.q_proj_moe_gen"] == amax["blk.0.gen.attn_q"]
    assert entry.verification["tensorrt_lint"]["enforced"] and entry.verification["outputs"]["hidden_out"][
        "rel_l2"] <= 1e-5
