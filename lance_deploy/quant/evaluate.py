"""Quality of a quantized model against its full-precision reference, on held-out prompts.

Both pipelines run the same requests with the same noise. Generation reports per-step velocity
error, final-latent SNR/PSNR/cosine and decoded PSNR/SSIM; understanding reports the exact-match
rate of greedy ids and the KL divergence of the first-step logits; the per-layer output SQNR
comes from replaying one recorded program through both models layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lance_deploy.calibrate.collect import TEXT_FIELD
from lance_deploy.calibrate.prompt_sets import load_prompt_set, select
from lance_deploy.calibrate.record import recording
from lance_deploy.calibrate.replay import run_layer
from lance_deploy.core.progress import bar
from lance_deploy.core.tasks import OUTPUT_FRAME_TASKS
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import GENERATION_TASKS, TaskRequest
from lance_deploy.quant.metrics import cosine, psnr_db, sqnr_db


@dataclass(frozen=True)
class EvalSettings:
    tasks: tuple[str, ...] = ("t2i", "x2t_image")
    samples: int = 4
    steps: int = 30
    height: int = 64
    width: int = 64
    frames: int = 9
    max_new_tokens: int = 16
    seed: int = 1234
    prompts_root: str = "calibration"


@dataclass
class EvalReport:
    tasks: dict = field(default_factory=dict)  # task -> metrics (means over samples)
    layer_sqnr_db: list = field(default_factory=list)
    images: list = field(default_factory=list)  # (name, reference uint8 [H,W,3], quantized uint8)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 images [H, W, 3] (gaussian window 11, sigma 1.5, per channel)."""
    x = torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255
    y = torch.from_numpy(b).permute(2, 0, 1)[None].double() / 255
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None]) / (g.sum() ** 2)
    w = w.expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, w, groups=3, padding=5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _request(task: str, text: str, i: int, s: EvalSettings, media) -> TaskRequest:
    req = TaskRequest(task=task, seed=s.seed + i, sampler=SamplerConfig(steps=s.steps), height=s.height,
                      width=s.width, frames=s.frames if task in OUTPUT_FRAME_TASKS else None,
                      max_new_tokens=s.max_new_tokens, preset="image_256res")
    if task.startswith("x2t"):
        req.question = text
    else:
        req.prompt = text
    if task in ("i2v", "image_edit", "x2t_image"):
        req.image = media["image"]
    elif task in ("video_edit", "x2t_video"):
        req.video, req.video_fps = media["video"], 12.0
    return req


def _gen_metrics(ref, q) -> dict:
    lat_r, lat_q = ref.latents[-1], q.latents[-1]
    vel = [float((a - b).norm() / a.norm()) for a, b in zip(ref.trace.v_guided, q.trace.v_guided)]
    ref_px = ref.frames.astype(np.float64)
    return {
        "final_latent_snr_db": sqnr_db(lat_r, lat_q), "final_latent_psnr_db": psnr_db(lat_r, lat_q),
        "final_latent_cosine": cosine(lat_r, lat_q),
        "decoded_psnr_db": psnr_db(torch.from_numpy(ref_px), torch.from_numpy(q.frames.astype(np.float64)),
                                   data_range=255.0),
        "decoded_ssim": float(np.mean([ssim(a, b) for a, b in zip(ref.frames, q.frames)])),
        "velocity_rel_err_per_step": vel,
    }


def _und_metrics(ref, q) -> dict:
    n = min(len(ref.token_ids), len(q.token_ids))
    same = sum(a == b for a, b in zip(ref.token_ids, q.token_ids)) / max(len(ref.token_ids), 1)
    lp, lq = F.log_softmax(ref.logits[0].double(), -1), F.log_softmax(q.logits[0].double(), -1)
    kl = float((lp.exp() * (lp - lq)).nan_to_num().sum())
    return {"greedy_exact_match": float(ref.token_ids[:n] == q.token_ids[:n] and len(ref.token_ids) == len(q.token_ids)),
            "greedy_token_agreement": same, "first_logits_kl": kl}


def _mean(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0]:
        v = [r[k] for r in rows]
        out[k] = [float(np.mean(c)) for c in zip(*v)] if isinstance(v[0], list) else float(np.mean(v))
    return out


def evaluate(reference: LancePipeline, quantized: LancePipeline, s: EvalSettings, media: dict,
             progress: bool | None = None) -> EvalReport:
    """Run every held-out request on both pipelines; `media` holds an 'image' and/or 'video' input."""
    report = EvalReport()
    with bar(len(s.tasks) * s.samples, "eval samples", unit="sample", enabled=progress) as b:
        for task in s.tasks:
            report.tasks[task] = _evaluate_task(reference, quantized, s, media, task, report, b)
    report.layer_sqnr_db = layer_sqnr(reference, quantized, s, media)
    return report


def _evaluate_task(reference, quantized, s: EvalSettings, media: dict, task: str, report: EvalReport, b) -> dict:
    """One task's held-out samples on both pipelines: the mean of their metrics (images go to `report`)."""
    rows = []
    entries = select(load_prompt_set(task, s.prompts_root, split="heldout"), s.samples, s.seed)
    for i, entry in enumerate(entries):
        req = _request(task, entry[TEXT_FIELD[task]], i, s, media)
        if task in GENERATION_TASKS:
            ref = reference(req, progress=False, trace=True)
            q = quantized(_request(task, entry[TEXT_FIELD[task]], i, s, media), progress=False, trace=True)
            rows.append(_gen_metrics(ref, q))
            report.images.append((f"{task}-{i}", ref.frames[0], q.frames[0]))
        else:
            rows.append(_und_metrics(reference(req, progress=False),
                                     quantized(_request(task, entry[TEXT_FIELD[task]], i, s, media),
                                               progress=False)))
        if b is not None:
            b.update(1)
    return _mean(rows)


def layer_sqnr(reference: LancePipeline, quantized: LancePipeline, s: EvalSettings, media) -> list[float]:
    """Per-layer output SQNR: one recorded t2i program replayed through both models' layers."""
    task = "t2i" if "t2i" in s.tasks else s.tasks[0]
    entry = select(load_prompt_set(task, s.prompts_root, split="heldout"), 1, s.seed)[0]
    with recording(reference.c.lm, task) as program:
        reference(_request(task, entry[TEXT_FIELD[task]], 0, s, media), progress=False)
    hidden = [[c.x for c in program.calls]]
    out = []
    device = reference.device
    for ref_layer, q_layer in zip(reference.c.lm.language_model.model.layers, quantized.c.lm.language_model.model.layers):
        ref_next = run_layer(ref_layer, reference.c.lm.cfg, [program], hidden, device)
        q_out = run_layer(q_layer, quantized.c.lm.cfg, [program], hidden, quantized.device)
        out.append(sqnr_db(torch.cat(ref_next[0]), torch.cat(q_out[0])))
        hidden = ref_next  # each layer is measured on the reference inputs, so errors do not compound
    return out
