"""Turn `run` options into a `TaskRequest`, and a result into files plus a summary."""

from __future__ import annotations

from pathlib import Path

import torch

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.fsutil import publish_bytes
from lance_deploy.media.metadata import sidecar_path, write_output
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
    noise = tensors["noise"]
    if not noise.is_floating_point() or not bool(torch.isfinite(noise).all()):
        raise LanceUsageError(f"--init-noise {path}: tensor 'noise' must hold finite floats ({noise.dtype})")
    return noise


def build_request(task: str, o: dict) -> TaskRequest:
    """Check every option, then read the media and files they name; nothing heavy is loaded here."""
    from lance_deploy.media.io import read_image, read_video

    sampler = SamplerConfig(steps=o["steps"], shift=o["shift"], cfg_scale=o["cfg"])
    req = TaskRequest(
        task=task, prompt=o.get("prompt"), negative_prompt=o.get("negative_prompt"), question=o.get("question"),
        system=o.get("system"),
        height=o.get("height"), width=o.get("width"), frames=o.get("frames"), sampler=sampler, seed=o["seed"],
        preset=o.get("resolution"), vae_area_side=o.get("vae_area_side"), vit_area_side=o.get("vit_area_side"),
        max_new_tokens=o["max_new_tokens"],
    )
    req.validate(media=False)  # a bad number or a missing --prompt never waits for a decode
    if o.get("image"):
        req.image = read_image(o["image"])
    if o.get("video"):
        req.video, req.video_fps = read_video(o["video"], o.get("fps"))
    if o.get("init_noise"):
        req.init_noise = _load_noise(o["init_noise"])
    return req.validate()


def _save_latents(latents, path: Path) -> None:
    from safetensors.torch import save

    data = save({f"final_latent_{i}": t.contiguous() for i, t in enumerate(latents)})
    publish_bytes(path, data, what="latents")


def write_outputs(task: str, result, out, save_latents: Path | None) -> dict:
    """Write the PNG/MP4 (with its parameters, `media.metadata`) or the x2t text, and return the
    JSON-able summary. `out` is a path (replaced atomically) or a `cli.out_names.OutTarget`, whose
    default name is never overwritten: a name taken meanwhile moves on to the next free one."""
    from lance_deploy.cli.out_names import OutTarget

    target = out if isinstance(out, OutTarget) else OutTarget(out)
    summary = {"task": task, "timings": {k: round(v, 4) for k, v in result.timings.items()}, "notes": result.notes}
    if hasattr(result, "text"):
        summary.update(text=result.text, token_ids=result.token_ids)
        if target.path is not None:
            _exclusive(target, lambda p, ow: publish_bytes(p, (result.text + "\n").encode("utf-8"), what="text",
                                                            overwrite=ow))
            summary["output"] = str(target.path)
        return summary
    frames = result.frames
    video = frames.shape[0] != 1 or target.path.suffix.lower() == ".mp4"
    _exclusive(target, lambda p, ow: write_output(frames, result.meta, p, video=video, overwrite=ow))
    if save_latents is not None:
        _save_latents(result.latents, save_latents)
        summary["latents"] = str(save_latents)
    summary.update(output=str(target.path), frames=int(frames.shape[0]), height=int(frames.shape[1]),
                   width=int(frames.shape[2]))
    if video and result.meta:
        summary["sidecar"] = str(sidecar_path(target.path))
    return summary


def _exclusive(target, write) -> None:
    """`write(path, overwrite)`; a default name (`target.unique`) that got taken moves to the next one."""
    while True:
        try:
            return write(target.path, not target.unique)
        except FileExistsError:
            target.next_free()
