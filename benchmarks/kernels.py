"""Each `QLinear` kernel path against bf16 `F.linear` at Lance's real Linear shapes.

Shapes (lance.md §1, the same in both experts): q_proj / o_proj 2048x2048, k_proj / v_proj
256x2048, gate_proj / up_proj 11008x2048, down_proj 2048x11008 ([out, in]). Token counts: decode
(1 and 16 rows) and denoise (4096 rows on CUDA). For every format the path `QLinear.forward`
dispatches to is marked `default`; the alternatives it could take (e.g. int8 weight-only's fused
kernel vs dequantize + GEMM) are timed too, so a GPU run shows where `DECODE_ROWS` should sit.
Every path is timed side by side in the same rounds (medians), and checked: `format_db` is the
SQNR of the format's reference path against the unquantized bf16 layer, `kernel_db` the same for
the kernel, `vs_ref_db` the kernel against the reference (None: bit-identical). `ok` means the
kernel loses at most `MAX_LOSS_DB` of the format's SQNR (bf16 arithmetic alone puts the kernel
about 50 dB from the reference, so a 10 dB margin over int8's ~41 dB costs ~0.4 dB). The
exit status is 1 when any path is not ok.

    python benchmarks/kernels.py --device cuda --json kernels.json     # CUDA events
    python benchmarks/kernels.py --device cpu --quick --json k.json    # seconds: small rows, CPU paths
    python benchmarks/kernels.py --device cpu --rows 1,16,256 --rounds 3 --iters 2   # docs/benchmarks.md

Ratios (`x_bf16` = path time / bf16 time; below 1 is faster) are the claim; absolute times
depend on the machine and, on a shared CPU, on its load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lance_deploy import formats
from lance_deploy.core.fsutil import publish_bytes
from lance_deploy.formats.qlinear import QLinear, _bnb, device_capability
from lance_deploy.quant.metrics import sqnr_db

SHAPES = {"q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (256, 2048), "gate_proj/up_proj": (11008, 2048),
          "down_proj": (2048, 11008)}
QUICK_SHAPES = ("k_proj/v_proj",)
W8A8 = "dynamic_per_token"
SPECS = {
    "fp8": formats.FormatSpec("fp8_e4m3"),
    "fp8_w8a8": formats.FormatSpec("fp8_e4m3", activations=W8A8),
    "int8": formats.FormatSpec("int8"),
    "int8_w8a8": formats.FormatSpec("int8", activations=W8A8),
    "int4_g128": formats.FormatSpec("int4", group_size=128),
    "nf4": formats.FormatSpec("nf4"),
}
# Paths each format can take; which ones exist on a device is decided by `_available`.
PATHS = {
    "fp8": ("dequant_matmul",),
    "fp8_w8a8": ("fp8_scaled_mm", "fp8_w8a8_reference"),
    "int8": ("int8_weight_mm", "dequant_matmul"),
    "int8_w8a8": ("int8_int_mm",),
    "int4_g128": ("int4_tinygemm", "int4_cpu", "dequant_matmul"),
    "nf4": ("nf4_bnb", "dequant_matmul"),
}
MAX_LOSS_DB = 1.0


def _available(kernel: str, device: torch.device) -> bool:
    cuda, cap = device.type == "cuda", device_capability(device)
    if kernel == "fp8_scaled_mm":
        return cuda and cap >= (8, 9)
    if kernel == "int4_tinygemm":
        return cuda and cap >= (8, 0)
    if kernel == "int4_cpu":
        return not cuda
    if kernel == "nf4_bnb":
        return _bnb() is not None
    return True


def _modules(p: formats.PackedTensor, device: torch.device) -> tuple[dict[str, QLinear], str]:
    """{kernel: module that takes it} for the paths of p's format on `device`, and the default one."""
    name = next(k for k, s in SPECS.items() if s == p.spec)
    fast = QLinear(p)
    fast.prepare(device)  # as the pipeline does on load
    probe = torch.zeros(1, p.shape[1], dtype=torch.bfloat16, device=device)
    default = fast.kernel(probe)
    out = {}
    for kernel in PATHS[name]:
        if not _available(kernel, device):
            continue
        if kernel in ("int4_tinygemm", "int4_cpu", "int8_int_mm"):
            out[kernel] = fast  # the prepared layout
            continue
        m = QLinear(p)
        m.kernel = lambda x, k=kernel: k  # force the path (an instance attribute shadows the method)
        out[kernel] = m
    return out, default


class Timer:
    """Per-call milliseconds of `fn`: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, iters: int):
        self.device, self.iters = device, iters

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / self.iters
        t0 = time.perf_counter()
        for _ in range(self.iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / self.iters


def bench_shape(linear: str, shape: tuple[int, int], tokens: tuple[int, ...], device: torch.device,
                rounds: int, iters: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(shape, generator=g, device=device) / shape[1] ** 0.5
    w_bf16 = w.to(torch.bfloat16)
    cases = []  # (format, kernel, default?, module)
    for name, spec in SPECS.items():
        p = formats.quantize_rtn(w, spec)
        mods, default = _modules(p, device)
        ref = QLinear(p, prefer_reference=True)
        cases += [(name, k, k == default, m, ref) for k, m in mods.items()]
    timer, rows = Timer(device, iters), []
    for n in tokens:
        x = torch.randn(n, shape[1], generator=g, device=device).to(torch.bfloat16)
        base = F.linear(x, w_bf16).float()
        fns = [lambda x=x: F.linear(x, w_bf16)] + [lambda m=m, x=x: m(x) for _, _, _, m, _ in cases]
        with torch.no_grad():
            for fn in fns:  # warm-up (cuBLAS handles, lazy inits)
                fn()
            times = [[] for _ in fns]
            for _ in range(rounds):  # side by side: every path once per round
                for i, fn in enumerate(fns):
                    times[i].append(timer(fn))
        ms = [statistics.median(t) for t in times]
        rows.append(_row(linear, shape, n, "bf16", "linear", True, ms[0], ms[0]))
        for (name, kernel, default, m, ref), t in zip(cases, ms[1:]):
            with torch.no_grad():
                y, r = m(x).float(), ref(x).float()
            quality = {"format_db": sqnr_db(base, r), "kernel_db": sqnr_db(base, y),
                       "vs_ref_db": None if torch.equal(y, r) else sqnr_db(r, y)}
            rows.append(_row(linear, shape, n, name, kernel, default, t, ms[0], **quality))
    return rows


def _row(linear, shape, n, fmt, kernel, default, ms, base_ms, **quality) -> dict:
    row = {"linear": linear, "out_x_in": f"{shape[0]}x{shape[1]}", "tokens": n, "format": fmt, "kernel": kernel,
           "default": default, "ms": round(ms, 4), "x_bf16": round(ms / base_ms, 3)}
    if quality:
        row.update({k: None if v is None else round(v, 1) for k, v in quality.items()})
        row["ok"] = bool(quality["kernel_db"] >= quality["format_db"] - MAX_LOSS_DB)
    return row


def markdown(rows: list[dict]) -> str:
    head = "| linear | out x in | tokens | format | kernel | ms | x bf16 | format SQNR | kernel SQNR | vs ref |"
    lines = [head, "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        kernel = r["kernel"] + (" (default)" if r["default"] and r["format"] != "bf16" else "")
        vs_ref = "-" if "ok" not in r else "same" if r["vs_ref_db"] is None else r["vs_ref_db"]
        lines.append(f"| {r['linear']} | {r['out_x_in']} | {r['tokens']} | {r['format']} | {kernel} | {r['ms']:.3f} "
                     f"| {r['x_bf16']:.2f} | {r.get('format_db', '-')} | {r.get('kernel_db', '-')} | {vs_ref} |")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    ap.add_argument("--quick", action="store_true", help="small row counts (1, 16, 64), the k/v shape, few "
                    "repetitions: a smoke run in seconds")
    ap.add_argument("--rows", type=_ints, help="token counts (default: 1,16,4096 on CUDA, 1,16,256 on CPU)")
    ap.add_argument("--rounds", type=int, help="timing rounds, each path once per round; the median is kept "
                    "(default 7; --quick 2)")
    ap.add_argument("--iters", type=int, help="calls per timing (default 20 on CUDA, 3 on CPU; --quick 1)")
    ap.add_argument("--json", dest="json_out", help="write the rows and the run's facts here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if device.type not in ("cuda", "cpu"):
        ap.error(f"--device {args.device}: expected cuda, cuda:N or cpu")
    tokens = args.rows or ((1, 16, 64) if args.quick else (1, 16, 4096) if device.type == "cuda" else (1, 16, 256))
    shapes = {k: SHAPES[k] for k in QUICK_SHAPES} if args.quick else SHAPES
    rounds, iters = (2, 1) if args.quick else (7, 20 if device.type == "cuda" else 3)
    rounds, iters = args.rounds or rounds, args.iters or iters
    if rounds < 1 or iters < 1:
        ap.error("--rounds and --iters: expected at least 1")
    torch.manual_seed(0)
    rows = []
    for i, (linear, shape) in enumerate(shapes.items()):
        print(f"[{i + 1}/{len(shapes)}] {linear} {shape[0]}x{shape[1]}", file=sys.stderr, flush=True)
        rows += bench_shape(linear, shape, tokens, device, rounds, iters)
    print(markdown(rows))
    if args.json_out:
        facts = {"command": " ".join(["python", "benchmarks/kernels.py"] + (argv or sys.argv[1:])),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                 or platform.machine(), "capability": device_capability(device), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "bitsandbytes": _bnb() is not None, "rows": rows}
        publish_bytes(args.json_out, (json.dumps(facts, indent=1) + "\n").encode(), what="kernel benchmark")
    bad = [r for r in rows if r.get("ok") is False]
    for r in bad:
        print(f"MISMATCH {r['format']} {r['kernel']} {r['out_x_in']} x{r['tokens']}: SQNR {r['kernel_db']} dB, the "
              f"reference path's {r['format_db']} dB", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
