"""Peak host RSS and wall time of `quantize` on a full-size checkpoint, vs reading its files once.

Each recipe runs in a fresh subprocess (so its peak RSS is its own); the baseline in the same run
is one sequential positioned read of the files the quantizer reads (model, ViT, VAE).

    python benchmarks/quantize_full.py --model /path/Lance_3B --recipes fp8-rtn int8-rtn --out /scratch/q
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from load_memory import _read_once


def _child(model: str, recipe: str, out: str) -> None:
    from lance_deploy.quant.quantize import quantize
    from lance_deploy.quant.recipe import load_recipe

    start = time.perf_counter()
    res = quantize(model, load_recipe(recipe), out, device="cpu", progress=False, restart=True, overwrite=True)
    print(json.dumps({"recipe": recipe, "seconds": time.perf_counter() - start, "bytes": res.plan.total_bytes,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipes", nargs="+", default=["fp8-rtn", "int8-rtn"])
    ap.add_argument("--out", required=True, help="scratch folder for the artifacts (deleted after each)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.model, *args.child)
        return
    from lance_deploy.checkpoint.layout import discover

    layout = discover(args.model)
    files = [layout.weights_file] + ([layout.vit_file] if layout.vit_file and not layout.has_bundled_vit else [])
    files += [layout.vae_file] if layout.vae_file else []
    read_s = _read_once(files)
    gib = 1024**3
    print(f"read once: {sum(f.stat().st_size for f in files) / gib:.2f} GiB in {read_s:.1f} s")
    print("| recipe | artifact (GiB) | peak RSS (GiB) | quantize s | read-once s | quantize / read |")
    print("|---|---|---|---|---|---|")
    for recipe in args.recipes:
        out = Path(args.out) / recipe
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--out", args.out,
                               "--child", recipe, str(out)], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {recipe} | {r['bytes'] / gib:.2f} | {r['peak_rss_bytes'] / gib:.2f} | {r['seconds']:.1f} | "
              f"{read_s:.1f} | {r['seconds'] / read_s:.2f}x |", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(str(out) + ".job", ignore_errors=True)


if __name__ == "__main__":
    main()
