"""Does a cheaper calibration cost quality? One recipe's rules, calibrated two ways, side by side.

Records the denser setting's programs once (``--dense-samples`` prompts per task, every step), takes
the cheaper setting from them (the first ``--samples`` programs, only the ``--stratified`` steps
the recorder would keep), quantizes the tiny model's decoder with the recipe's rules from each
(layer-sequential, as `quantize` does), and reports the final-latent SNR against fp32 on held-out
t2i prompts with the same noise (as benchmarks/quant_quality.py), plus each setting's recorded
calls and its layer-loop seconds.

    python benchmarks/calibration_settings.py --recipe budget-8gb --dense-samples 8 --samples 4 --stratified 10
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lance_deploy.calibrate.collect import CollectSettings, collect_programs
from lance_deploy.calibrate.prompt_sets import load_prompt_set, select
from lance_deploy.calibrate.record import Program, stratified_steps
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.layout import discover
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.quant.apply import linear_jobs
from lance_deploy.quant.layerwise import quantize_layers
from lance_deploy.quant.metrics import sqnr_db
from lance_deploy.quant.plan import resolve_plan
from lance_deploy.quant.recipe import load_recipe


def _final_latents(pipe, lm, prompts, steps: int, size: int) -> list[torch.Tensor]:
    """Final t2i latents of `lm` (CFG 4 default), seeds 1000+i: the same noise for every model."""
    pipe.c.lm = lm
    return [pipe(TaskRequest(task="t2i", prompt=p, height=size, width=size, seed=1000 + i,
                             sampler=SamplerConfig(steps=steps)), progress=False).latents[-1]
            for i, p in enumerate(prompts)]


def _thin(programs: list[Program], n: int, keep: set[int]) -> list[Program]:
    """The first n programs with only the kept denoising steps (prefill chunks always stay)."""
    return [Program(p.task, [c for c in p.calls if c.step is None or c.step in keep]) for p in programs[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/golden/ckpt/Lance_3B")
    ap.add_argument("--recipe", default="budget-8gb")
    ap.add_argument("--dense-samples", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--stratified", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--calib-size", type=int, default=256, help="reference-run height = width, as the recipes")
    ap.add_argument("--size", type=int, default=64, help="held-out t2i height = width")
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    layout = discover(args.model)
    plan = resolve_plan(cn.layout_shapes(layout), load_recipe(args.recipe))
    jobs = {i: linear_jobs(e for e in plan.entries if e.packed and cn.layer_of(e.name) == i
                           and cn.is_linear_weight(e.name)) for i in range(layout.config().num_hidden_layers)}
    start = time.perf_counter()
    dense = collect_programs(layout.model_dir, CollectSettings(tasks=("t2i",), samples_per_task=args.dense_samples,
                                                                steps=args.steps, height=args.calib_size,
                                                                width=args.calib_size))
    print(f"recorded {len(dense)} dense programs in {time.perf_counter() - start:.0f} s", flush=True)
    settings = {f"{args.dense_samples} prompts, all {args.steps} steps": dense,
                f"{args.samples} prompts, {args.stratified} stratified steps":
                    _thin(dense, args.samples, stratified_steps(args.steps, args.stratified))}
    pipe = LancePipeline.from_path(layout.model_dir, "t2i", device="cpu", dtype="float32")
    ref_lm = pipe.c.lm
    heldout = [e["prompt"] for e in select(load_prompt_set("t2i", split="heldout"), args.eval_samples, 0)]
    ref = _final_latents(pipe, ref_lm, heldout, args.steps, args.size)
    rows = []
    for label, programs in settings.items():
        lm = copy.deepcopy(ref_lm)
        t = time.perf_counter()
        for _ in quantize_layers(lm.cfg, programs, lambda i, lm=lm: lm.language_model.model.layers[i],
                                 lambda i: jobs[i], torch.device("cpu")):
            pass
        seconds = time.perf_counter() - t
        got = _final_latents(pipe, lm, heldout, args.steps, args.size)
        snr = sum(sqnr_db(r, q) for r, q in zip(ref, got)) / len(ref)
        rows.append({"setting": label, "recorded_calls": sum(len(p.calls) for p in programs),
                     "layer_loop_s": round(seconds, 1), "final_latent_snr_db": round(snr, 2)})
        print(f"| {label} | {rows[-1]['recorded_calls']} | {seconds:.1f} | {snr:.2f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out), "model": str(args.model)},
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
