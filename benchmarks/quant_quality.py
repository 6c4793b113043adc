"""Quality of every format × algorithm on tiny Lance models, side by side in one run.

For each model (the plain tiny checkpoint and one with planted activation outliers) this
1. records calibration programs (t2i calibration prompts, both CFG branches, stratified steps),
2. quantizes every expert Linear layer by layer (sequential: each layer calibrated on the
   quantized outputs of the layers before it),
3. runs held-out t2i prompts through the default 30-step loop with CFG 4, with the same noise as
   the fp32 run, and reports final-latent SNR = 20·log10(‖ref‖ / ‖ref − q‖), averaged in dB;
4. reports the per-Linear output SQNR of int4 AWQ vs RTN vs nf4 on the recorded inputs.

    python benchmarks/quant_quality.py --out docs/quant_quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from lance_deploy.checkpoint.make import make_checkpoint
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.quant.apply import LinearJob
from lance_deploy.calibrate.prompt_sets import load_prompt_set, select
from lance_deploy.calibrate.collect import CollectSettings, collect_programs
from lance_deploy.calibrate.record import stratified_steps
from lance_deploy.model.tree import EXPERTS, INPUT_GROUPS
from lance_deploy.formats import FormatSpec
from lance_deploy.quant.layerwise import quantize_layers
from lance_deploy.quant.metrics import sqnr_db

W8A8 = "dynamic_per_token"
CONFIGS = [  # (label, spec or cast dtype, algorithm)
    ("cast fp16", torch.float16, "cast"),
    ("cast bf16", torch.bfloat16, "cast"),
    ("fp8 weight-only RTN", FormatSpec("fp8_e4m3"), "rtn"),
    ("fp8 weight-only GPTQ", FormatSpec("fp8_e4m3"), "gptq"),
    ("fp8 W8A8 RTN", FormatSpec("fp8_e4m3", activations=W8A8), "rtn"),
    ("fp8 W8A8 SmoothQuant", FormatSpec("fp8_e4m3", activations=W8A8), "smoothquant"),
    ("fp8 W8A8 GPTQ", FormatSpec("fp8_e4m3", activations=W8A8), "gptq"),
    ("int8 weight-only RTN", FormatSpec("int8"), "rtn"),
    ("int8 weight-only GPTQ", FormatSpec("int8"), "gptq"),
    ("int8 W8A8 RTN", FormatSpec("int8", activations=W8A8), "rtn"),
    ("int8 W8A8 SmoothQuant", FormatSpec("int8", activations=W8A8), "smoothquant"),
    ("int4 g64 RTN", FormatSpec("int4", group_size=64), "rtn"),
    ("int4 g64 AWQ", FormatSpec("int4", group_size=64), "awq"),
    ("int4 g64 GPTQ", FormatSpec("int4", group_size=64), "gptq"),
    ("nf4 (bitsandbytes layout) RTN", FormatSpec("nf4"), "rtn"),
    ("bitsandbytes LLM.int8 (threshold 6)", "int8", "bnb"),
    ("bitsandbytes nf4 (Linear4bit)", "nf4", "bnb"),
]


def _linear_paths() -> list[str]:
    return [m for e in EXPERTS for g in INPUT_GROUPS.values() for m in g.paths(e)]


def _cast(lm, dtype):
    """Plain casting baseline: every expert Linear weight round-tripped through `dtype`."""
    for layer in lm.language_model.model.layers:
        for path in _linear_paths():
            w = layer.get_submodule(path).weight
            w.data = w.data.to(dtype).to(w.dtype)


def _bnb(lm, kind: str):
    """bitsandbytes' own modules in place of every expert Linear (CPU kernels of bnb >= 0.45)."""
    import bitsandbytes as bnb

    for layer in lm.language_model.model.layers:
        for path in _linear_paths():
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            old = getattr(parent, name)
            if kind == "int8":
                new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(old.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                        quant_type="nf4", compute_dtype=torch.float32)
                new.weight = bnb.nn.Params4bit(old.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if old.bias is not None:
                new.bias = torch.nn.Parameter(old.bias.data.clone(), requires_grad=False)
            setattr(parent, name, new.to("cpu"))


def _final_latents(pipe, lm, prompts, steps: int, size: int) -> list[torch.Tensor]:
    pipe.c.lm = lm
    outs = []
    for i, p in enumerate(prompts):
        req = TaskRequest(task="t2i", prompt=p, height=size, width=size, seed=1000 + i,
                          sampler=SamplerConfig(steps=steps))
        outs.append(pipe(req, progress=False).latents[-1])
    return outs


def evaluate_model(ckpt: Path, args) -> dict:
    settings = CollectSettings(tasks=("t2i",), samples_per_task=args.calib_samples, steps=args.steps,
                               keep_steps=tuple(sorted(stratified_steps(args.steps, args.calib_steps))), height=args.size, width=args.size)
    programs = collect_programs(ckpt / "Lance_3B", settings)
    pipe = LancePipeline.from_path(ckpt / "Lance_3B", "t2i", device="cpu", dtype="float32")
    ref_lm = pipe.c.lm
    heldout = [e["prompt"] for e in select(load_prompt_set("t2i", split="heldout"), args.eval_samples, 0)]
    ref = _final_latents(pipe, ref_lm, heldout, args.steps, args.size)
    rows = []
    for label, spec, algo in CONFIGS:
        start = time.perf_counter()
        lm = copy.deepcopy(ref_lm)
        if algo == "cast":
            _cast(lm, spec)
        elif algo == "bnb":
            _bnb(lm, spec)
        else:
            jobs = {p: LinearJob(p, spec, algo) for p in _linear_paths()}
            for _ in quantize_layers(lm.cfg, programs, lambda i: lm.language_model.model.layers[i],
                                     lambda i: jobs, torch.device("cpu")):
                pass
        got = _final_latents(pipe, lm, heldout, args.steps, args.size)
        snr = sum(sqnr_db(r, q) for r, q in zip(ref, got)) / len(ref)
        rows.append({"config": label, "final_latent_snr_db": round(snr, 2),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {label:32s} {snr:6.2f} dB", flush=True)
    return {"rows": rows, "layer_sqnr": layer_sqnr(ref_lm, programs)}


def layer_sqnr(lm, programs) -> dict:
    """Mean per-Linear output SQNR (dB) on recorded inputs: int4 RTN vs AWQ vs nf4, same data."""
    from lance_deploy.quant.algorithms import LayerStats, awq, rtn
    from lance_deploy.calibrate.replay import observe, run_layer
    from lance_deploy.formats import effective_weight

    int4, nf4 = FormatSpec("int4", group_size=64), FormatSpec("nf4")
    totals = {"int4 RTN": [], "int4 AWQ": [], "nf4": []}
    hidden = [[c.x for c in p.calls] for p in programs]
    for layer in lm.language_model.model.layers:
        stats = {}

        def make(expert, group, layer=layer):
            path = INPUT_GROUPS[group].probe(expert)
            return stats.setdefault((expert, group), LayerStats(layer.get_submodule(path).weight.shape[1],
                                                                cap=4096, hessian_dtype=None))

        handles = observe(layer, make)
        hidden = run_layer(layer, lm.cfg, programs, hidden, torch.device("cpu"))
        for h in handles:
            h.remove()
        for (expert, group), s in stats.items():
            for m in INPUT_GROUPS[group].paths(expert):
                w = layer.get_submodule(m).weight.float()
                x = s.rows
                ref = x @ w.t()
                for name, packed in (("int4 RTN", rtn(w, s, int4)), ("int4 AWQ", awq(w, s, int4).runtime()),
                                     ("nf4", rtn(w, s, nf4))):
                    totals[name].append(sqnr_db(ref, x @ effective_weight(packed).t()))
    return {k: round(sum(v) / len(v), 2) for k, v in totals.items()}


def _only(configs: list[str] | None) -> None:
    """Restrict CONFIGS to the labels given (for re-running a few rows)."""
    if configs:
        CONFIGS[:] = [c for c in CONFIGS if c[0] in configs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=64, help="t2i height = width (pixels)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-steps", type=int, default=10, help="stratified steps kept per calibration run")
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", nargs="*", help="run only these config labels")
    args = ap.parse_args()
    _only(args.only)
    results = {"settings": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, outliers in (("plain", False), ("outliers", True)):
            ckpt = make_checkpoint(Path(tmp) / name, size="tiny", outliers=outliers, progress=False)
            print(f"{name} tiny model", flush=True)
            results[name] = evaluate_model(ckpt, args)
            print(f"  layer SQNR: {results[name]['layer_sqnr']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
