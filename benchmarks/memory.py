"""Peak VRAM and seconds per denoising step under a budget, vs the all-resident run (GPU only).

For each task the same request runs in this process on the same device: all weights resident,
then planned under `--gpu-memory` once per `--markers` policy (streamed expert layers with
prefetch; the marker rows streamed or served by a compact copy). It reports
`torch.cuda.max_memory_allocated` / `max_memory_reserved`, seconds per step (per decoded token
for x2t), the planner's predicted peak and its error, and the budget/resident time ratio. Use a full-size checkpoint from
`lance-deploy make-checkpoint --full` (bf16) or a quantized artifact.

    python benchmarks/memory.py --model /scratch/full-bf16 --gpu-memory 12GiB \
        --task t2i:768x768 --task t2v:480x848x121 --task x2t_image --markers stream auto
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lance_deploy.core.units import parse_size
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.planning.request import plan_residency
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.planning.planner import MARKER_POLICIES

MEDIA = {"i2v": "image", "image_edit": "image", "x2t_image": "image", "video_edit": "video", "x2t_video": "video"}


def _request(spec: str, steps: int) -> TaskRequest:
    """'t2v:480x848x121' -> a TaskRequest with random media where the task needs it."""
    task, _, size = spec.partition(":")
    dims = [int(v) for v in size.split("x")] if size else []
    h, w = (dims + [None, None])[:2]
    frames = dims[2] if len(dims) > 2 else None
    rng = np.random.default_rng(0)
    req = TaskRequest(task=task, prompt="a red boat on a blue river", question="What is shown?",
                      height=h, width=w, frames=frames, sampler=SamplerConfig(steps=steps), max_new_tokens=32)
    if MEDIA.get(task) == "image":
        req.image = rng.integers(0, 255, (h or 768, w or 768, 3), dtype=np.uint8)
    elif MEDIA.get(task) == "video":
        req.video, req.video_fps = rng.integers(0, 255, (frames or 69, h or 480, w or 848, 3), dtype=np.uint8), 12.0
    return req


def _measure(pipe: LancePipeline, spec: str, steps: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = pipe(_request(spec, steps), progress=False)
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "s_per_step": out.timings.get("s_per_step"),
            "peak_alloc": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", action="append", required=True, help="task[:HxW[xFRAMES]]")
    ap.add_argument("--gpu-memory", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--markers", nargs="+", default=["auto"], choices=MARKER_POLICIES,
                    help="marker-row policies to run under the budget, side by side")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/memory.py measures VRAM and needs a CUDA GPU; none is available here")
    budget, gib = parse_size(args.gpu_memory), 1024**3
    print(f"device: {torch.cuda.get_device_name()}  budget {budget / gib:.1f} GiB  steps {args.steps}")
    print("| task | mode | peak alloc GiB | peak reserved GiB | predicted GiB | error | s/step | budget/resident |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.task:
        task = spec.partition(":")[0]
        resident = LancePipeline.from_path(args.model, task, device="cuda", dtype="bfloat16")
        rows = [("resident", _measure(resident, spec, args.steps), None)]
        del resident
        torch.cuda.empty_cache()
        for policy in args.markers:
            plan = plan_residency(args.model, _request(spec, args.steps), budget, torch.bfloat16, markers=policy)
            paged = LancePipeline.from_path(args.model, task, device="cuda", dtype="bfloat16",
                                            memory_plan=plan if plan.needs_residency() else None)
            rows.append((f"budget, markers {policy} ({plan.plan.marker_mode() or 'n/a'})",
                         _measure(paged, spec, args.steps), plan.plan.peak.total / gib))
            del paged
            torch.cuda.empty_cache()
        base = rows[0][1]
        for mode, m, predicted in rows:
            per = "s_per_step" if m["s_per_step"] else "seconds"
            err = "" if predicted is None else f"{predicted / (m['peak_reserved'] / gib) - 1:+.1%}"
            print(f"| {spec} | {mode} | {m['peak_alloc'] / gib:.2f} | {m['peak_reserved'] / gib:.2f} | "
                  f"{'' if predicted is None else f'{predicted:.2f}'} | {err} | {m['s_per_step'] or 0:.3f} | "
                  f"{m[per] / base[per]:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
