"""Our ``--target tensorrt`` Q/DQ gen-layer graph against NVIDIA ModelOpt's ONNX PTQ of the same fp32 graph.

One golden tiny gen layer (``Lance_3B``, layer 1) is exported in fp32 (TorchScript, opset 17). Then:

* ModelOpt: ``modelopt.onnx.quantization.quantize`` on that file, ``quantize_mode`` int8 and fp8,
  ``calibration_method='max'``, ``high_precision_dtype='fp32'`` (no fp16 rewrite, so errors compare),
  CPU calibration, fed the calibration inputs below through an onnxruntime CalibrationDataReader;
* ours: the same layer with every Linear RTN-quantized (int8 / fp8_e4m3 W8A8, per-channel weights),
  the per-tensor input amax observed on the SAME calibration inputs (max, ``quant/act_amax.py``),
  exported with ``export_qdq_graph(..., target='tensorrt')``.

Printed side by side: which tensors are quantized (inputs of Linear MatMuls, of the attention
MatMuls, of residual Adds, other), node counts, the TensorRT lint, and the output error
(relative L2) against the fp32 graph on held-out inputs (other seeds, two token counts).

    pip install --no-deps nvidia-modelopt   # plus its light deps: pyproject's `bench` extra
    python benchmarks/modelopt_compare.py [--json docs/modelopt_compare.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lance_deploy.export.graphs import GenLayerGraph
from lance_deploy.export.onnx_export import export_graph
from lance_deploy.export.parts import LAYER_AXES, GraphJob, layer_inputs
from lance_deploy.export.qdq import export_qdq_graph
from lance_deploy.export.sources import open_source
from lance_deploy.export.trt_lint import errors, lint_model
from lance_deploy.formats import FormatSpec, quantize_rtn
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.quant.act_amax import install_amax, observe_w8a8_inputs
from lance_deploy.runtime.graphs import session_options

CKPT = (Path(__file__).resolve().parents[1] / ".." / "shared" / "golden" / "ckpt" / "Lance_3B").resolve()
LAYER = 1
CALIB = [(18, 8, s) for s in range(8)] + [(40, 24, 8 + s) for s in range(8)]  # (n, Lc, seed)
HELD_OUT = [(18, 8, 500 + s) for s in range(4)] + [(41, 23, 600 + s) for s in range(4)]
PROFILES = {"n": [3, 18, 64], "Lc": [1, 8, 64]}


def _feeds(source, cases) -> list[dict[str, np.ndarray]]:
    names = GenLayerGraph.input_names
    return [dict(zip(names, (t.numpy() for t in layer_inputs(source, n, lc, seed=s)))) for n, lc, s in cases]


def _job(source, module) -> GraphJob:
    graph = GenLayerGraph(module)
    return GraphJob(f"gen-layer.{LAYER:02d}", "gen-layer", graph, layer_inputs(source, 18, 8, seed=1),
                    list(graph.input_names), list(graph.output_names), dict(LAYER_AXES), PROFILES, {"layer": LAYER})


def _ours(source, spec: FormatSpec, calib, root: Path) -> Path:
    """RTN W8A8 layer, amax observed on the calibration feeds, exported for TensorRT."""
    from lance_deploy.export.reference import kv_cache
    from lance_deploy.model.mot import Routing

    layer = source.layer(LAYER, with_gen=True)
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, QLinear.from_linear(child, quantize_rtn(child.weight, spec)))
    observers, handles = observe_w8a8_inputs(layer)
    with torch.no_grad():
        for f in calib:
            x, cos, sin, pk, pv = (torch.from_numpy(f[k]) for k in GenLayerGraph.input_names)
            n = x.shape[0]
            layer(x, (cos, sin), Routing.of(n, torch.arange(1, n - 1)), kv_cache(source, LAYER, pk, pv), False, False)
    for h in handles:
        h.remove()
    install_amax(layer, {p: o.value("max", 100.0) for p, o in observers.items()})
    entry = export_qdq_graph(_job(source, layer), root, "image_256res", target="tensorrt")
    return root / entry.file


class _Reader:
    """A calibration reader over a list of feeds, with the get_first / rewind ModelOpt's readers have."""

    def __init__(self, feeds):
        self.feeds = list(feeds)
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def get_first(self):
        return self.feeds[0]

    def rewind(self):
        self.it = iter(self.feeds)


def _modelopt(fp32: Path, mode: str, calib, out: Path) -> Path:
    from modelopt.onnx.quantization import quantize
    from onnxruntime.quantization import CalibrationDataReader

    reader = type("R", (_Reader, CalibrationDataReader), {})(calib)
    quantize(str(fp32), quantize_mode=mode, calibration_data_reader=reader, calibration_method="max",
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(out), log_level="ERROR")
    return out


def _placement(path: Path) -> dict:
    """Which tensors feed a QuantizeLinear, by where the dequantized value goes, and node counts."""
    import onnx

    model = onnx.load(str(path))
    nodes = model.graph.node
    inits = {t.name for t in model.graph.initializer} | {n.output[0] for n in nodes if n.op_type == "Constant"}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in nodes for o in n.output}

    def weight_side(mm) -> bool:  # the other operand is a (fake-)quantized initializer: a Linear
        for i in mm.input:
            p = producer.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                src = producer.get(p.input[0])
                if p.input[0] in inits or (src is not None and src.op_type == "QuantizeLinear" and src.input[0] in inits):
                    return True
        return False

    def kind(q) -> str:
        if q.input[0] in inits:
            return "weights (Q of an fp32 initializer)"
        uses = [u for dq in consumers.get(q.output[0], []) for u in consumers.get(dq.output[0], [])]
        if any(u.op_type == "Gemm" or (u.op_type == "MatMul" and weight_side(u)) for u in uses):
            return "Linear inputs"
        if any(u.op_type == "MatMul" for u in uses):
            return "attention MatMul inputs"
        if any(u.op_type == "Add" for u in uses):
            return "Add inputs (RoPE, residual)"
        return "other (" + "/".join(sorted({u.op_type for u in uses})) + ")"

    kinds = Counter(kind(q) for q in nodes if q.op_type == "QuantizeLinear")
    weight_dq = sum(1 for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    ops = Counter(n.op_type for n in nodes)
    return {"quantized": dict(kinds), "weight DQ (stored quantized)": weight_dq, "nodes": len(nodes),
            "QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"],
            "MatMul": ops["MatMul"], "Gemm": ops["Gemm"], "lint errors": _lint_summary(model, path.parent)}


def _lint_summary(model, base: Path) -> str:
    bad = errors(lint_model(model, None, base))
    problems = Counter(f"{f.op}: {f.problem}" for f in bad)
    return "; ".join(f"{n}x {p}" for p, n in problems.items()) or "0"


def _error(path: Path, fp32: Path, held_out) -> float:
    import onnxruntime as ort

    def run(p):
        s = ort.InferenceSession(str(p), session_options(), providers=["CPUExecutionProvider"])
        return [s.run(None, f)[0].astype(np.float64) for f in held_out]

    got, ref = run(path), run(fp32)
    return max(float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(got, ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=CKPT)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    source = open_source(args.model)
    calib, held_out = _feeds(source, CALIB), _feeds(source, HELD_OUT)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32"
        (fp32 / "graphs").mkdir(parents=True)
        fp32 = fp32 / export_graph(_job(source, source.layer(LAYER, with_gen=True)), fp32, "image_256res",
                                   "torchscript").file
        rows["fp32"] = dict(_placement(fp32), rel_l2=0.0)
        for mode, spec in (("int8", FormatSpec("int8", activations="dynamic_per_token")),
                           ("fp8", FormatSpec("fp8_e4m3", activations="dynamic_per_token"))):
            ours = _ours(source, spec, calib, tmp / f"ours-{mode}")
            rows[f"ours {mode}"] = dict(_placement(ours), rel_l2=_error(ours, fp32, held_out))
            try:
                theirs = _modelopt(fp32, mode, calib, tmp / f"modelopt-{mode}.onnx")
                rows[f"modelopt {mode}"] = dict(_placement(theirs), rel_l2=_error(theirs, fp32, held_out))
            except Exception as e:  # noqa: BLE001 - any ModelOpt failure is a result: the table says why
                rows[f"modelopt {mode}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    keys = ["quantized", "weight DQ (stored quantized)", "nodes", "QuantizeLinear", "DequantizeLinear", "MatMul",
            "Gemm", "lint errors", "rel_l2"]
    print("| graph | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        cells = [", ".join(f"{k}: {v}" for k, v in sorted(r[k].items())) or "none" if k == "quantized" else
                 (f"{r[k]:.2e}" if k == "rel_l2" else str(r[k])) for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
