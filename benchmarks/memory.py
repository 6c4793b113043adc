"""Peak VRAM and seconds per denoising step under a budget, vs the all-resident run (GPU only).

For each task the same request runs twice in this process on the same device: all weights
resident, then planned under `--gpu-memory` (streamed expert layers with prefetch). It reports
`torch.cuda.max_memory_allocated` / `max_memory_reserved`, seconds per step, the planner's
predicted peak, and the paged/resident ratios. Use a full-size checkpoint from
`lance-deploy make-checkpoint --full` (bf16) or a quantized artifact.

    python benchmarks/memory.py --model /scratch/full-bf16 --gpu-memory 12GiB \
        --task t2i:768x768 --task t2v:480x848x121 --task x2t_image
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lance_deploy.cli.plan_memory import parse_size
from lance_deploy.pipeline.pipeline import LancePipeline, needs_streaming, plan_residency
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest

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
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/memory.py measures VRAM and needs a CUDA GPU; none is available here")
    budget, gib = parse_size(args.gpu_memory), 1024**3
    print(f"device: {torch.cuda.get_device_name()}  budget {budget / gib:.1f} GiB  steps {args.steps}")
    print("| task | mode | peak alloc GiB | peak reserved GiB | predicted GiB | s/step | paged/resident time |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.task:
        task = spec.partition(":")[0]
        resident = LancePipeline.from_path(args.model, task, device="cuda", dtype="bfloat16")
        r = _measure(resident, spec, args.steps)
        del resident
        torch.cuda.empty_cache()
        plan = plan_residency(args.model, _request(spec, args.steps), budget, torch.bfloat16)
        paged = LancePipeline.from_path(args.model, task, device="cuda", dtype="bfloat16",
                                        memory_plan=plan if needs_streaming(plan) else None)
        p = _measure(paged, spec, args.steps)
        del paged
        torch.cuda.empty_cache()
        predicted = max(ph.total for ph in plan.plan.phases) / gib
        for mode, m in (("resident", r), ("budget", p)):
            ratio = m["seconds"] / r["seconds"]
            print(f"| {spec} | {mode} | {m['peak_alloc'] / gib:.2f} | {m['peak_reserved'] / gib:.2f} | "
                  f"{predicted:.2f} | {m['s_per_step'] or 0:.3f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
