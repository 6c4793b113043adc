"""Build `TaskRequest`s and `run` command lines from golden case descriptions."""

from __future__ import annotations

import numpy as np

from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest

GENERATION_CASES = ("t2i", "t2v", "i2v", "image_edit", "video_edit")
UNDERSTANDING_CASES = ("x2t_image", "x2t_video")


def request_from_case(meta: dict, tensors: dict) -> TaskRequest:
    task, inputs, p = meta["task"], meta["inputs"], meta["params"]
    override = p.get("bucket_area_side_override") or {}
    media = inputs.get("media")
    req = TaskRequest(task=task, preset=p.get("resolution_preset"),
                      vae_area_side=override.get("vae"), vit_area_side=override.get("vit"))
    if media is not None:
        frames = tensors["media_uint8"].numpy()
        if media["kind"] == "image":
            req.image = frames
        else:
            req.video, req.video_fps = frames, float(media["fps"])
    if task.startswith("x2t"):
        req.system, req.question = inputs["instruction(system)"], inputs["question"]
        req.max_new_tokens = p["max_length"]
        return req
    req.prompt = inputs["text"]
    target = inputs.get("target")
    if isinstance(target, dict):
        req.height, req.width, req.frames = target.get("H"), target.get("W"), target.get("num_frames")
    req.sampler = SamplerConfig(steps=p["num_timesteps"], shift=p["timestep_shift"], cfg_scale=p["cfg_text_scale"],
                                cfg_interval=tuple(p["cfg_interval"]), renorm_min=float(p["cfg_renorm_min"]))
    req.init_noise = tensors["noise"]
    return req


def write_media(meta: dict, tensors: dict, folder) -> list[str]:
    """Write the case's media as a PNG or a frame folder; return the `run` options naming it."""
    from PIL import Image

    media = meta["inputs"].get("media")
    if media is None:
        return []
    frames = tensors["media_uint8"].numpy().astype(np.uint8)
    if media["kind"] == "image":
        path = folder / "input.png"
        Image.fromarray(frames).save(path)
        return ["--image", str(path)]
    d = folder / "frames"
    d.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / f"{i:05d}.png")
    return ["--video", str(d), "--fps", str(media["fps"])]


def run_args(meta: dict, tensors: dict, folder) -> list[str]:
    """The `lance-deploy run` arguments that reproduce a case."""
    task, inputs, p = meta["task"], meta["inputs"], meta["params"]
    args = [task, "--device", "cpu", "--dtype", "float32", "--resolution", p["resolution_preset"]]
    override = p.get("bucket_area_side_override") or {}
    if override:
        args += ["--vae-area-side", str(override["vae"]), "--vit-area-side", str(override["vit"])]
    args += write_media(meta, tensors, folder)
    if task.startswith("x2t"):
        return args + ["--system", inputs["instruction(system)"], "--question", inputs["question"],
                       "--max-new-tokens", str(p["max_length"])]
    args += ["--prompt", inputs["text"], "--steps", str(p["num_timesteps"]), "--shift", str(p["timestep_shift"]),
             "--cfg", str(p["cfg_text_scale"])]
    target = inputs.get("target")
    if isinstance(target, dict):
        for opt, key in (("--height", "H"), ("--width", "W"), ("--frames", "num_frames")):
            if target.get(key) is not None:
                args += [opt, str(target[key])]
    from safetensors.torch import save_file

    save_file({"noise": tensors["noise"].contiguous()}, str(folder / "noise.safetensors"))
    return args + ["--init-noise", str(folder / "noise.safetensors"), "--save-latents", str(folder / "latents.safetensors")]
