"""Peak VRAM per phase and seconds per denoising step under budgets, vs the all-resident run.

For each task the same request runs in this process on the same device: all weights resident,
then planned under each `--gpu-memory` budget (streamed expert layers with prefetch, the marker
rows per `--markers`). Per run it records `torch.cuda.max_memory_allocated` of each planner
phase (reset at every phase boundary) and `max_memory_reserved`, seconds per step (per decoded
token for x2t), and the planner's allocated / total prediction for each phase beside them
(`planning.rehearsal.planned_peaks`, the numbers the fake-CUDA rehearsal is held to). The request
is `planning.rehearsal.request`, the one `benchmarks/rehearse.py` rehearses. Use a full-size
checkpoint from `lance-deploy make-checkpoint --full --dtype bfloat16`, or a quantized artifact.

    python benchmarks/memory.py --model /scratch/full-bf16/Lance_3B_Video --gpu-memory 16GiB 12GiB 8GiB \\
        --task t2i --task t2v:480x848x121 --task x2t_image --json /tmp/memory.json
    python benchmarks/memory.py --model /tmp/tiny/Lance_3B --device cpu --task t2i:64x64 --gpu-memory 12MiB

`--device cpu` is the dry run (the tiny model in CI): the same code, no peaks (there is no
CUDA allocator to ask), seconds only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch

from lance_deploy.core.fsutil import publish_bytes
from lance_deploy.core.units import GiB, parse_size
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.planning.planner import MARKER_POLICIES
from lance_deploy.planning.rehearsal import (
    parse_task,
    plan_request,
    planned_peaks,
    request,
)


class PhasePeaks:
    """`max_memory_allocated` per phase: read and reset at each phase boundary."""

    def __init__(self, cuda: bool):
        self.cuda, self.phase, self.peaks = cuda, "load", {}

    def __call__(self, phase: str) -> None:
        self._close()
        self.phase = phase

    def _close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def finish(self) -> dict:
        self._close()
        return self.peaks


def measure(pipe: LancePipeline, req, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    peaks = PhasePeaks(cuda)
    pipe.phase_observers.append(peaks)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = pipe(req, progress=False)
    phase_peaks = peaks.finish()
    seconds = time.perf_counter() - start
    tokens = len(getattr(out, "token_ids", None) or ())  # x2t: decode time per generated token
    return {"seconds": round(seconds, 3), "s_per_step": out.timings.get("s_per_step"),
            "s_per_token": out.timings["decode_s"] / tokens if tokens else None,
            "peak_alloc": max(phase_peaks.values()) if cuda else None,
            "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
            "phase_alloc": phase_peaks if cuda else {}}


def run_task(model: str, spec: str, budgets: list[str], args, device: torch.device) -> list[dict]:
    task, h, w, f = parse_task(spec)
    req = request(task, h, w, f, steps=args.steps, max_new_tokens=args.max_new_tokens)
    rows = []
    for budget in [None, *budgets]:
        for policy in ["auto"] if budget is None else args.markers:
            mp = plan_request(model, req, budget, markers=policy)
            row = {"task": task, "spec": spec, "label": args.label, "budget": budget or "resident", "markers": policy,
                   "fits": mp.fits, "marker_mode": mp.plan.marker_mode() if budget else None}
            if not mp.fits:
                rows.append({**row, "error": mp.suggestion})
                continue
            paged = budget is not None and mp.needs_residency()
            pipe = LancePipeline.from_path(model, task, device=str(device), dtype="bfloat16",
                                           memory_plan=mp if paged else None)
            try:
                m = measure(pipe, req, device)
            finally:
                del pipe
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            planned = planned_peaks(mp, paged)
            row.update(m, paged=paged, planned_alloc=max(a for a, _ in planned.values()),
                       planned_total=max(t for _, t in planned.values()),
                       phases={name: {"measured_alloc": m["phase_alloc"].get(name), "planned_alloc": a,
                                      "planned_total": t} for name, (a, t) in planned.items()})
            rows.append(row)
            print(_line(row), flush=True)
    base = rows[0].get("s_per_step") or rows[0].get("s_per_token") or rows[0].get("seconds")
    for r in rows:
        per = r.get("s_per_step") or r.get("s_per_token") or r.get("seconds")
        r["vs_resident"] = round(per / base, 3) if per and base else None
    return rows


def _line(r: dict) -> str:
    gib = lambda v: "-" if v is None else f"{v / GiB:.2f}"
    err = "-" if not r.get("peak_alloc") else f"{r['planned_alloc'] / r['peak_alloc'] - 1:+.1%}"
    per = r.get("s_per_step") or r.get("s_per_token") or r["seconds"]
    return (f"{r['spec']} {r['budget']} markers {r['markers']}: peak alloc {gib(r.get('peak_alloc'))} GiB, "
            f"reserved {gib(r.get('peak_reserved'))} GiB, planned alloc {gib(r['planned_alloc'])} ({err}), "
            f"planned total {gib(r['planned_total'])} GiB, {per:.3f} s/step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a release folder or a quantized artifact")
    ap.add_argument("--task", action="append", required=True, help="task[:HxW[xFRAMES]] (repeatable)")
    ap.add_argument("--gpu-memory", nargs="*", default=[], help="budgets besides all-resident, e.g. 16GiB 8GiB")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run (no peaks)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--markers", nargs="+", default=["auto"], choices=MARKER_POLICIES,
                    help="marker-row policies to run under each budget, side by side")
    ap.add_argument("--label", default="bf16", help="what the weights are, for the report (bf16, fp8-rtn, ...)")
    ap.add_argument("--json", dest="json_out", help="write every run as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/memory.py --device cuda measures VRAM and needs a CUDA GPU; none is available "
                         "here (--device cpu is the dry run)")
    for b in args.gpu_memory:
        parse_size(b)  # a typo fails before any model loads
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}  steps {args.steps}", flush=True)
    rows = []
    for spec in args.task:
        rows += run_task(args.model, spec, args.gpu_memory, args, device)
    if args.json_out:
        publish_bytes(Path(args.json_out), json.dumps(rows, indent=1).encode())


if __name__ == "__main__":
    main()
