"""What static per-tensor activation scales (``export --target tensorrt``) cost against dynamic per-token ones.

For the plain tiny model and the one with planted activation outliers (``make-checkpoint --outliers``):

1. record calibration programs (t2i calibration prompts, stratified steps, both CFG branches);
2. quantize every expert Linear layer by layer to W8A8 (each algorithm below); quantize's own
   propagation pass records each W8A8 input's amax (``quant/act_amax.py``), here both ways: max and
   the 99.99th percentile of |x|;
3. run held-out t2i prompts through the 30-step loop with CFG 4 (same noise as the fp32 run) three
   times on the SAME quantized weights: dynamic per-token scales (the PyTorch runtime and the
   onnxruntime target), static max, static percentile (``QLinear.use_static_activations``, the
   arithmetic of the TensorRT graph), and reports final-latent SNR = 20·log10(‖ref‖ / ‖ref − q‖).

    python benchmarks/static_scales.py --out docs/static_scales.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from lance_deploy.calibrate.collect import CollectSettings, collect_programs
from lance_deploy.calibrate.prompt_sets import load_prompt_set, select
from lance_deploy.calibrate.record import stratified_steps
from lance_deploy.calibrate.replay import run_layer
from lance_deploy.checkpoint.make import make_checkpoint
from lance_deploy.formats import FormatSpec
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.model.tree import EXPERTS, INPUT_GROUPS
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.quant.act_amax import observe_w8a8_inputs
from lance_deploy.quant.apply import LinearJob
from lance_deploy.quant.layerwise import quantize_layers
from lance_deploy.quant.metrics import sqnr_db

W8A8 = "dynamic_per_token"
CONFIGS = [  # (label, spec, algorithm)
    ("int8 W8A8 RTN", FormatSpec("int8", activations=W8A8), "rtn"),
    ("int8 W8A8 SmoothQuant", FormatSpec("int8", activations=W8A8), "smoothquant"),
    ("fp8 W8A8 RTN", FormatSpec("fp8_e4m3", activations=W8A8), "rtn"),
    ("fp8 W8A8 GPTQ", FormatSpec("fp8_e4m3", activations=W8A8), "gptq"),
]
PERCENTILE = 99.99
MODES = ("dynamic per-token", "static max", f"static p{PERCENTILE:g}")


def _linear_paths() -> list[str]:
    return [p for e in EXPERTS for g in INPUT_GROUPS.values() for p in g.paths(e)]


def _final_latents(pipe, lm, prompts, steps: int, size: int) -> list[torch.Tensor]:
    pipe.c.lm = lm
    outs = []
    for i, p in enumerate(prompts):
        req = TaskRequest(task="t2i", prompt=p, height=size, width=size, seed=1000 + i,
                          sampler=SamplerConfig(steps=steps))
        outs.append(pipe(req, progress=False).latents[-1])
    return outs


def _both_amax(lm, programs) -> list[dict[str, tuple[float, float]]]:
    """Per layer: module path -> (max, percentile) amax of each W8A8 input, on the quantized model's
    propagated calibration inputs (what quantize's own pass sees, in dynamic mode)."""
    hidden, out = [[c.x for c in p.calls] for p in programs], []
    for layer in lm.language_model.model.layers:
        observers, handles = observe_w8a8_inputs(layer)
        hidden = run_layer(layer, lm.cfg, programs, hidden, torch.device("cpu"))
        for h in handles:
            h.remove()
        out.append({p: (o.value("max", 100.0), o.value("percentile", PERCENTILE)) for p, o in observers.items()})
    return out


def _set_mode(lm, amax, mode: str) -> None:
    for layer, values in zip(lm.language_model.model.layers, amax):
        for path, (mx, pc) in values.items():
            q: QLinear = layer.get_submodule(path)
            if mode == MODES[0]:
                q.use_static_activations(False)
            else:
                q.act_amax = mx if mode == MODES[1] else pc
                q.use_static_activations(True)


def evaluate_model(ckpt: Path, args) -> list[dict]:
    settings = CollectSettings(tasks=("t2i",), samples_per_task=args.calib_samples, steps=args.steps,
                               keep_steps=tuple(sorted(stratified_steps(args.steps, args.calib_steps))),
                               height=args.size, width=args.size)
    programs = collect_programs(ckpt / "Lance_3B", settings)
    pipe = LancePipeline.from_path(ckpt / "Lance_3B", "t2i", device="cpu", dtype="float32")
    ref_lm = pipe.c.lm
    heldout = [e["prompt"] for e in select(load_prompt_set("t2i", split="heldout"), args.eval_samples, 0)]
    ref = _final_latents(pipe, ref_lm, heldout, args.steps, args.size)
    rows = []
    for label, spec, algo in CONFIGS:
        start = time.perf_counter()
        lm = copy.deepcopy(ref_lm)
        jobs = {p: LinearJob(p, spec, algo) for p in _linear_paths()}
        layers = lm.language_model.model.layers
        for _ in quantize_layers(lm.cfg, programs, layers.__getitem__, lambda i, jobs=jobs: jobs, torch.device("cpu")):
            pass
        amax = _both_amax(lm, programs)
        row = {"config": label}
        for mode in MODES:
            _set_mode(lm, amax, mode)
            got = _final_latents(pipe, lm, heldout, args.steps, args.size)
            row[mode] = round(sum(sqnr_db(r, q) for r, q in zip(ref, got)) / len(ref), 2)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"  {label:24s} " + "  ".join(f"{m}: {row[m]:6.2f} dB" for m in MODES), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=64, help="t2i height = width (pixels)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-steps", type=int, default=10, help="stratified steps kept per calibration run")
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--models", nargs="*", default=["plain", "outliers"], choices=["plain", "outliers"])
    ap.add_argument("--only", nargs="*", help="run only these config labels, in this order")
    args = ap.parse_args()
    if args.only:
        CONFIGS[:] = [next(c for c in CONFIGS if c[0] == label) for label in args.only]
    results = {"settings": vars(args) | {"out": str(args.out)}, "modes": list(MODES)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = make_checkpoint(Path(tmp) / name, size="tiny", outliers=name == "outliers", progress=False)
            print(f"{name} tiny model", flush=True)
            results[name] = evaluate_model(ckpt, args)
            if args.out:  # after each model, so a long run leaves what it measured
                args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
