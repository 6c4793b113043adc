"""Turn `run` options into a `TaskRequest`, and a result into files plus a summary."""

from __future__ import annotations

from pathlib import Path

import torch

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.fsutil import atomic_path
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest


def _load_noise(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise LanceUsageError(f"--init-noise {path}: file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LanceUsageError(f"--init-noise {path}: not a readable safetensors file ({e})") from None
    if "noise" not in tensors:
        raise LanceUsageError(f"--init-noise {path}: no tensor named 'noise' (found {', '.join(tensors) or 'none'})")
    return tensors["noise"]


def build_request(task: str, o: dict) -> TaskRequest:
    """Read media and files named by the options; nothing heavy is loaded here."""
    from lance_deploy.media.io import read_image, read_video

    image = read_image(o["image"]) if o.get("image") else None
    video, fps = (read_video(o["video"], o.get("fps")) if o.get("video") else (None, None))
    sampler = SamplerConfig(steps=o["steps"], shift=o["shift"], cfg_scale=o["cfg"])
    return TaskRequest(
        task=task, prompt=o.get("prompt"), question=o.get("question"), system=o.get("system"),
        image=image, video=video, video_fps=fps, height=o.get("height"), width=o.get("width"),
        frames=o.get("frames"), sampler=sampler, seed=o["seed"], preset=o.get("preset"),
        vae_area_side=o.get("vae_area_side"), vit_area_side=o.get("vit_area_side"),
        init_noise=_load_noise(o["init_noise"]) if o.get("init_noise") else None,
        max_new_tokens=o["max_new_tokens"],
    )


def _save_latents(latents, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({f"final_latent_{i}": t.contiguous() for i, t in enumerate(latents)}, str(tmp))


def write_outputs(task: str, result, out: Path | None, save_latents: Path | None) -> dict:
    """Write the PNG/MP4 (or text) and return the JSON-able summary."""
    from lance_deploy.media.io import write_image, write_video

    summary = {"task": task, "timings": {k: round(v, 4) for k, v in result.timings.items()}, "notes": result.notes}
    if hasattr(result, "text"):
        summary.update(text=result.text, token_ids=result.token_ids)
        if out is not None:
            with atomic_path(out) as tmp:
                Path(tmp).write_text(result.text + "\n", encoding="utf-8")
            summary["output"] = str(out)
        return summary
    frames = result.frames
    is_image = frames.shape[0] == 1
    out = out or Path(f"lance-{task}.{'png' if is_image else 'mp4'}")
    if is_image and out.suffix.lower() != ".mp4":
        write_image(frames[0], out)
    else:
        write_video(frames, out, fps=12)
    if save_latents is not None:
        _save_latents(result.latents, save_latents)
        summary["latents"] = str(save_latents)
    summary.update(output=str(out), frames=int(frames.shape[0]), height=int(frames.shape[1]),
                   width=int(frames.shape[2]))
    return summary
