"""Peak host RSS and wall time of `quantize` on a full-size checkpoint, vs reading its files once.

Each recipe runs in a fresh subprocess (so its peak RSS is its own); the baseline in the same run
is one sequential positioned read of the files the quantizer reads (model, ViT, VAE), the faster of
a buffered read into one reused buffer and an O_DIRECT read (what the quantizer does), and the
I/O floor is the O_DIRECT read while another thread writes, also with O_DIRECT (and fsyncs, per
256 MiB file), as many bytes as the first recipe wrote: its artifact plus its job folder. Each
starts with the source files evicted from the page cache.

    python benchmarks/quantize_full.py --model /path/Lance_3B --recipes fp8-rtn int8-rtn --out /scratch/q
"""

from __future__ import annotations

import argparse
import json
import mmap
import resource
import shutil
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from load_memory import _read_once


def _evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so every measurement starts cold (a 27 GB release
    may be partly cached by whatever ran before, which made two runs of the same command disagree 2x)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _read_while_writing(files: list[Path], nbytes: int, scratch: Path) -> float:
    """Seconds for `_read_once(files, direct=True)` and writing `nbytes` to `scratch` at the same time."""
    scratch.mkdir(parents=True, exist_ok=True)
    block, part = mmap.mmap(-1, 64 << 20), 256 << 20  # page-aligned, as O_DIRECT wants
    block.write(os.urandom(len(block)))

    def write() -> None:
        left, i = nbytes, 0
        while left > 0:
            fd = os.open(scratch / f"w{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            try:
                for _ in range(min(left, part) // len(block) or 1):
                    os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
            left, i = left - part, i + 1

    start = time.perf_counter()
    writer = threading.Thread(target=write)
    writer.start()
    _read_once(files, direct=True)
    writer.join()
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds


def _child(model: str, recipe: str, out: str) -> None:
    from lance_deploy.core.host_memory import prefer_huge_pages

    prefer_huge_pages()  # what the CLI does before torch is imported
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
    _evict(files)
    buffered_s = _read_once(files)
    _evict(files)
    direct_s = _read_once(files, direct=True)
    read_s = min(buffered_s, direct_s)
    gib = 1024**3
    print(f"read once: {sum(f.stat().st_size for f in files) / gib:.2f} GiB in {buffered_s:.1f} s buffered, "
          f"{direct_s:.1f} s O_DIRECT")
    rows, floor = [], None
    for recipe in args.recipes:
        out = Path(args.out) / recipe
        _evict(files)
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--out", args.out,
                               "--child", recipe, str(out)], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        written = _tree_bytes(out) + _tree_bytes(Path(str(out) + ".job"))
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(str(out) + ".job", ignore_errors=True)
        if floor is None:
            _evict(files)
            floor = _read_while_writing(files, written, Path(args.out) / "io-floor")
            print(f"read once while writing {written / gib:.2f} GiB (artifact + job folder): {floor:.1f} s")
        rows.append(f"| {recipe} | {r['bytes'] / gib:.2f} | {written / gib:.2f} | {r['peak_rss_bytes'] / gib:.2f} | "
                    f"{r['seconds']:.1f} | {read_s:.1f} | {floor:.1f} | {r['seconds'] / read_s:.2f}x | "
                    f"{r['seconds'] / floor:.2f}x |")
        print(rows[-1], flush=True)
    print("| recipe | artifact (GiB) | written (GiB) | peak RSS (GiB) | quantize s | read-once s | I/O floor s "
          "| quantize / read | quantize / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
