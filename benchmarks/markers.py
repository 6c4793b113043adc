"""The denoising marker rows: streamed und layers (exact) vs a resident int8 / int4 copy.

Part 1, quality (CPU, tiny models, plain and with planted activation outliers): held-out t2i
prompts run all resident, then with the denoise span serving the 2 marker rows from a compact
copy of every und layer (the context prefill stays exact), same noise, 30 steps, CFG 4. Reports
final-latent SNR and decoded-image PSNR vs the exact run, and the bytes the denoise span moved
(streaming would move the und expert once per forward instead).

Part 2, the planner's choice at release shapes (a header-only release, no weights): per task
and budget, what `--markers auto` picks, the und bytes streaming would copy per forward, the
copy's resident bytes, and the estimated slowdown of streaming (copies overlapped with compute
at the planner's assumed 25 GB/s and 60 TFLOPS; an estimate, not a GPU measurement).

    python benchmarks/markers.py --out docs/markers.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from lance_deploy.checkpoint.headers_only import make_header_only_release
from lance_deploy.checkpoint.make import make_checkpoint
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.calibrate.prompt_sets import load_prompt_set, select
from lance_deploy.quant.metrics import sqnr_db
from lance_deploy.planning.memory_plan import ModelInfo, PlanRequest, make_plan
from lance_deploy.core.units import GiB
from lance_deploy.runtime.residency import Span

FORMATS = ("int8", "int4")
PLANS = [("t2i", 512, 512, None), ("t2i", 768, 768, None), ("image_edit", 768, 768, None),
         ("t2v", 480, 848, 121), ("video_edit", 480, 848, 69)]
BUDGETS_GIB = (12, 8, 6)


def _spans(fmt: str | None, layers: int) -> list[Span]:
    llm = ("norms_bridges",)
    return [Span("prefill", llm, {"und": 0, "gen": 0}),
            Span("denoise", llm, {"und": layers if fmt else 0, "gen": 0}, fmt),
            Span("vae_decode", ("vae_decoder",))]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def quality(ckpt: Path, prompts: list[str], size: int, steps: int) -> dict:
    """Per format: mean latent SNR, mean decoded PSNR and the denoise span's moved bytes."""
    model = ckpt / "Lance_3B"
    runs = {}
    for fmt in (None,) + FORMATS:
        pipe = LancePipeline.from_path(model, "t2i", device="cpu", dtype="float32")
        res = pipe.attach_residency(_spans(fmt, len(pipe.c.lm.language_model.model.layers)))
        outs = [pipe(TaskRequest(task="t2i", prompt=p, height=size, width=size, seed=1000 + i,
                                 sampler=SamplerConfig(steps=steps)), progress=False) for i, p in enumerate(prompts)]
        und = sum(res.unit_bytes(f"und.{i}") for i in range(res.n_layers))
        runs[fmt] = (outs, res.ledger.phase_moved.get("denoise", 0) // len(prompts), und)
    ref = runs[None][0]
    rows = {}
    for fmt in FORMATS:
        outs, moved, und = runs[fmt]
        rows[fmt] = {
            "latent_snr_db": round(sum(sqnr_db(r.latents[-1], o.latents[-1]) for r, o in zip(ref, outs)) / len(ref), 2),
            "decoded_psnr_db": round(sum(_psnr(r.frames, o.frames) for r, o in zip(ref, outs)) / len(ref), 2),
            "denoise_moved_bytes_per_request": moved,
            "und_bytes_streaming_moves_per_forward": und,
        }
    return rows


def planner_choices(root: Path) -> list[dict]:
    rows = []
    infos = {v: ModelInfo.load(root, "t2v" if v else "t2i") for v in (False, True)}
    for task, h, w, f in PLANS:
        for gib in BUDGETS_GIB:
            req = PlanRequest(task, gib * GiB, h, w, f)
            auto = make_plan(infos[task in ("t2v", "video_edit")], req)
            stream = make_plan(infos[task in ("t2v", "video_edit")], PlanRequest(task, gib * GiB, h, w, f,
                                                                                    markers="stream"))
            if not stream.fits:
                rows.append({"task": task, "size": f"{h}x{w}" + (f"x{f}" if f else ""), "budget_gib": gib,
                             "choice": "does not fit"})
                continue
            da = next(p for p in auto.plan.phases if p.name == "denoise")
            ds = next(p for p in stream.plan.phases if p.name == "denoise")
            k = ds.streamed.get("und_expert", 0)
            rows.append({
                "task": task, "size": f"{h}x{w}" + (f"x{f}" if f else ""), "budget_gib": gib,
                "choice": auto.plan.marker_mode(),
                "und_layers_streamed": k,
                "stream_bytes_per_forward": ds.streamed_bytes // max(ds.forwards, 1),
                "stream_est_slowdown": round(ds.slowdown, 3) if ds.slowdown else None,
                "copy_bytes": sum(v for c, v in da.resident.items() if c.startswith("und_markers")),
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="t2i sides in pixels (tiny model)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    prompts = [e["prompt"] for e in select(load_prompt_set("t2i", split="heldout"), args.prompts, 0)]
    results = {"settings": {"steps": args.steps, "sizes": args.sizes, "prompts": args.prompts}, "quality": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, outliers in (("plain", False), ("outliers", True)):
            ckpt = make_checkpoint(Path(tmp) / name, size="tiny", outliers=outliers, progress=False)
            for size in args.sizes:
                rows = quality(ckpt, prompts, size, args.steps)
                results["quality"][f"{name} {size}px"] = rows
                for fmt, r in rows.items():
                    print(f"{name:8s} {size:4d}px {fmt}: latent SNR {r['latent_snr_db']:6.2f} dB, decoded PSNR "
                          f"{r['decoded_psnr_db']:6.2f} dB, denoise moved {r['denoise_moved_bytes_per_request']:,} B "
                          f"(streaming: {r['und_bytes_streaming_moves_per_forward']:,} B per forward)", flush=True)
        root = make_header_only_release(Path(tmp) / "full", Path(tmp) / "plain" / "Lance_3B")
        results["planner"] = planner_choices(root)
    print("| task | size | budget | auto's choice | stream plan: und layers streamed | B per forward | "
          "est. slowdown | auto: copy B |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["planner"]:
        if r["choice"] == "does not fit":
            print(f"| {r['task']} | {r['size']} | {r['budget_gib']} GiB | does not fit | | | | |")
            continue
        print(f"| {r['task']} | {r['size']} | {r['budget_gib']} GiB | {r['choice']} | {r['und_layers_streamed']} | "
              f"{r['stream_bytes_per_forward'] / GiB:.2f} GiB | {r['stream_est_slowdown'] or 1:.2f}x | "
              f"{r['copy_bytes'] / GiB:.2f} GiB |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
