"""Peak host memory and time of loading each task's components from a (full-size) checkpoint.

Each task loads in a fresh subprocess so its peak RSS is its own. The baseline in the same run
is one sequential read of the same weight files (positioned reads, nothing kept), so the load
time is reported as a ratio to plain I/O.

    python benchmarks/load_memory.py --model /path/to/download --dtype bfloat16 --tasks x2t_image t2i
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 64 << 20


def _read_once(paths: list[Path], direct: bool = False) -> float:
    """Seconds to read the files once into one reused buffer; `direct`: with O_DIRECT (no page
    cache), into an anonymous map, which is page-aligned as O_DIRECT wants."""
    start = time.perf_counter()
    buf = mmap.mmap(-1, CHUNK) if direct else bytearray(CHUNK)
    for p in paths:
        fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                offset += n
        finally:
            os.close(fd)
    return time.perf_counter() - start


def _child(model: str, task: str, dtype: str) -> None:
    import torch

    from lance_deploy.pipeline.pipeline import LancePipeline

    start = time.perf_counter()
    pipe = LancePipeline.from_path(model, task, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - start
    modules = [m for m in (pipe.c.lm, pipe.c.vit, pipe.c.vae) if m is not None]
    loaded = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    layout = pipe.c.layout
    files = [layout.weights_file]
    if pipe.c.vit is not None and not layout.has_bundled_vit:
        files.append(layout.vit_file)
    if pipe.c.vae is not None:
        files.append(layout.vae_file)
    print(json.dumps({
        "task": task, "dtype": dtype, "load_s": seconds, "loaded_bytes": loaded,
        "file_bytes": sum(Path(f).stat().st_size for f in files), "files": [str(f) for f in files],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch": torch.__version__,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tasks", nargs="+", default=["x2t_image", "t2i", "image_edit"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.model, args.child, args.dtype)
        return
    rows = []
    for task in args.tasks:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--dtype", args.dtype,
                              "--child", task], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["read_once_s"] = _read_once([Path(f) for f in row["files"]])
        row["load_over_read"] = row["load_s"] / row["read_once_s"]
        rows.append(row)
    gib = 1024**3
    print("| task | dtype | files read (GiB) | loaded (GiB) | peak RSS (GiB) | load s | read-once s | load / read |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['dtype']} | {r['file_bytes'] / gib:.2f} | {r['loaded_bytes'] / gib:.2f} | "
              f"{r['peak_rss_bytes'] / gib:.2f} | {r['load_s']:.1f} | {r['read_once_s']:.1f} | "
              f"{r['load_over_read']:.2f}x |")


if __name__ == "__main__":
    main()
