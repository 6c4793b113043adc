"""The `eval` stage: run both models, then write report.json, report.md and side-by-side PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lance_deploy.calibrate.prompt_sets import load_prompt_set, select
from lance_deploy.core.fsutil import atomic_path
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import VIDEO_TASKS, TaskRequest
from lance_deploy.quant.evaluate import EvalSettings, evaluate

NEEDS = {"i2v": "image", "image_edit": "image", "x2t_image": "image", "video_edit": "video", "x2t_video": "video"}


def _media(reference: LancePipeline, s: EvalSettings, needs: set[str]) -> dict:
    """Held-out media made by the reference model from held-out t2i/t2v prompts."""
    media = {}
    for kind, task in (("image", "t2i"), ("video", "t2v")):
        if kind in needs:
            prompt = select(load_prompt_set(task, s.prompts_root, split="heldout"), 1, s.seed)[0]["prompt"]
            req = TaskRequest(task=task, prompt=prompt, height=s.height, width=s.width, seed=s.seed,
                              frames=s.frames if task == "t2v" else None, sampler=SamplerConfig(steps=s.steps))
            out = reference(req, progress=False)
            media[kind] = out.frames[0] if kind == "image" else out.frames
    return media


def _markdown(report: dict) -> str:
    lines = [f"# Quality report: {report['model']}", "", f"Reference: `{report['reference']}`", "",
             "| task | metric | value |", "|---|---|---|"]
    for task, metrics in report["tasks"].items():
        for k, v in metrics.items():
            shown = f"{v:.4g}" if isinstance(v, float) else ", ".join(f"{x:.3g}" for x in v)
            lines.append(f"| {task} | {k} | {shown} |")
    lines += ["", "Per-layer output SQNR (dB): " + ", ".join(f"{v:.1f}" for v in report["layer_sqnr_db"]), ""]
    lines += [f"![{name}]({name})" for name in report["images"]]
    return "\n".join(lines) + "\n"


def run_eval(reference_path, model_path, out_dir, *, tasks, samples, steps, size, device="auto",
             progress=True) -> dict:
    """Evaluate `model_path` (an artifact) against `reference_path`; returns the JSON report."""
    from lance_deploy.media.io import write_image

    video = any(t in VIDEO_TASKS for t in tasks)
    load = tuple(tasks) + (("t2v",) if video else ()) + ("t2i",)
    ref = LancePipeline.from_path(reference_path, load, device=device, dtype="float32")
    quant = LancePipeline.from_path(model_path, tuple(tasks) + ("t2i",), device=device, dtype="float32")
    s = EvalSettings(tasks=tuple(tasks), samples=samples, steps=steps, height=size, width=size)
    result = evaluate(ref, quant, s, _media(ref, s, {NEEDS[t] for t in tasks if t in NEEDS}), progress=progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for name, a, b in result.images:
        write_image(np.concatenate([a, b], axis=1), out_dir / f"{name}.png")
        images.append(f"{name}.png")
    report = {"reference": str(reference_path), "model": str(model_path), "settings": vars(s) | {"tasks": list(tasks)},
              "tasks": result.tasks, "layer_sqnr_db": result.layer_sqnr_db, "images": images}
    with atomic_path(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(_markdown(report))
    report["markdown"] = str(out_dir / "report.md")
    return report
