"""One calibration-sized reference run (tiny t2i, 256×256, 30 steps, CFG) under three OpenMP
settings, each in a fresh process: 1 thread, 2 threads spinning (OMP_WAIT_POLICY=ACTIVE, the
libgomp default before lance_deploy set PASSIVE), 2 threads waiting passively (what
`import lance_deploy` now sets). On a machine whose cores are shared, spinning threads make every
small op wait for a scheduler quantum.

    python benchmarks/omp_wait.py --model /path/to/golden/ckpt/Lance_3B
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = (("1 thread", "1", "PASSIVE"), ("2 threads, spinning", "2", "ACTIVE"), ("2 threads, passive", "2", "PASSIVE"))


def _child(model: str, runs: int) -> None:
    import torch

    from lance_deploy.pipeline.pipeline import LancePipeline
    from lance_deploy.pipeline.sampler import SamplerConfig
    from lance_deploy.pipeline.tasks import TaskRequest

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    pipe = LancePipeline.from_path(model, ("t2i",), device="cpu", dtype="float32")
    req = TaskRequest(task="t2i", prompt="a red fox in snow", height=256, width=256, seed=0, preset="image_256res",
                      sampler=SamplerConfig(steps=30))
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        pipe(req, progress=False)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.model, args.runs)
        return
    print("| setting | seconds per run (each run) |\n|---|---|")
    for label, threads, wait in SETTINGS:
        env = {**os.environ, "BENCH_THREADS": threads, "OMP_WAIT_POLICY": wait}
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--runs", str(args.runs), "--child"],
                             env=env, capture_output=True, text=True, check=True).stdout
        s = json.loads(out.strip().splitlines()[-1])["seconds"]
        print(f"| {label} | {min(s):.1f} ({', '.join(f'{x:.1f}' for x in s)}) |", flush=True)


if __name__ == "__main__":
    main()
