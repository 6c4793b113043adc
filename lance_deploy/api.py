"""The Python front end: a pipeline from a path and the same choices as `lance-deploy run`.

Diffusers-style::

    from lance_deploy.api import LancePipeline
    pipe = LancePipeline.from_pretrained("~/Lance", task="t2i", gpu_memory="12GiB")
    out = pipe(prompt="a red boat", negative_prompt="blurry", num_inference_steps=30, guidance_scale=4.0,
               height=768, width=768, seed=42)
    out.images[0].save("boat.png")        # PIL; out.frames: uint8 arrays, out.text: x2t answers

or with a `TaskRequest` (every option `run` has)::

    pipe = load_pipeline("~/Lance", task="t2i")
    out = pipe(TaskRequest(task="t2i", prompt="a red boat", height=512, width=512))

It sits beside `cli/` at the top of the package: it plans (`planning`), builds the graph
backend (`export.backend`) and hands both to `pipeline.LancePipeline`, which knows neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lance_deploy.api_session import EditSession  # noqa: F401  (re-exported: multi-turn editing)
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.tasks import UNDERSTANDING_TASKS, VIDEO_TASKS
from lance_deploy.pipeline.pipeline import LancePipeline as _Pipeline
from lance_deploy.pipeline.tasks import TaskRequest


def load_pipeline(path, task: str | tuple[str, ...], *, gpu_memory=None, backend: str | None = None,
                  graphs=None, markers: str = "auto", vit=None, vae=None, device=None, dtype=None, request=None,
                  compile: bool = False):
    """`LancePipeline.from_path` with a budget and a backend given by name (`~` expanded).

    `gpu_memory` ('12GiB' or bytes) plans residency for `request` (a `TaskRequest`; the task's
    defaults when None); `backend` is "torch", "onnxruntime" or "tensorrt"; `compile` compiles each
    backbone layer (`runtime.compile`, as `run --compile`). Returns this module's
    `LancePipeline`, which takes a `TaskRequest` or diffusers-style keywords."""
    return LancePipeline.from_pretrained(path, task, gpu_memory=gpu_memory, backend=backend, graphs=graphs,
                                         markers=markers, vit=vit, vae=vae, device=device, dtype=dtype,
                                         request=request, compile=compile)


def _load(cls, path, task, *, gpu_memory, backend, graphs, markers, vit, vae, device, dtype, request, compile=False):
    from lance_deploy.pipeline.pipeline import resolve_device, resolve_dtype

    if not isinstance(path, (str, Path)):
        raise LanceUsageError(f"from_pretrained: expected a folder path, got {type(path).__name__}")
    path = Path(path).expanduser()
    tasks = (task,) if isinstance(task, str) else tuple(task)
    engine = None
    if backend not in (None, "torch") or graphs is not None:
        from lance_deploy.export.backend import make_backend

        variant = "video" if any(t in VIDEO_TASKS for t in tasks) else "image"
        engine = make_backend(backend or "torch", path, graphs, vit=vit, vae=vae, variant=variant)
    plan = None
    if gpu_memory is not None:
        from lance_deploy.planning.request import plan_residency

        dev = resolve_device(device)
        plan = plan_residency(path, request or TaskRequest(task=tasks[0]), gpu_memory, resolve_dtype(dtype, dev),
                              vit=vit, vae=vae, markers=markers)
    return cls.from_path(path, tasks, vit=vit, vae=vae, device=device, dtype=dtype, backend=engine, memory_plan=plan,
                         compile=compile)


@dataclass
class LanceOutput:
    """What a keyword call returns, one entry per prompt: `images` (PIL, for single-frame outputs),
    `frames` (uint8 [T, H, W, 3] per output), `text` (x2t answers), `meta` (the parameters each
    output carries, `media.metadata`) and `outputs` (the pipeline's own results)."""

    images: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    text: list = field(default_factory=list)
    meta: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def save(self, path, index: int = 0) -> Path:
        """Write output `index` as a PNG (one frame) or an MP4 + sidecar, with its parameters (as `run`)."""
        from lance_deploy.media.metadata import write_output

        if not self.frames:
            raise LanceUsageError("save: this result holds text, not images or videos")
        path = Path(path).expanduser()
        write_output(self.frames[index], self.meta[index], path)
        return path


class LancePipeline(_Pipeline):
    """`pipeline.LancePipeline` with `from_pretrained` and diffusers-style call keywords."""

    @classmethod
    def from_pretrained(cls, path, task: str | tuple[str, ...] = "t2i", *, gpu_memory=None, backend: str | None = None,
                        graphs=None, markers: str = "auto", vit=None, vae=None, device=None, dtype=None,
                        request=None, compile: bool = False) -> LancePipeline:
        """Load a release checkpoint (download or model folder) or a quantized artifact for `task`."""
        return _load(cls, path, task, gpu_memory=gpu_memory, backend=backend, graphs=graphs, markers=markers,
                     vit=vit, vae=vae, device=device, dtype=dtype, request=request, compile=compile)

    def __call__(self, request: TaskRequest | None = None, /, *, prompt=None, negative_prompt: str | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 4.0, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, generator=None, seed=None, image=None,
                 video=None, fps: float | None = None, shift: float = 3.5, system: str | None = None,
                 max_new_tokens: int = 256, task: str | None = None, callback_on_step_end=None,
                 progress: bool = False, **run_options):
        """A `TaskRequest` runs as in `pipeline.LancePipeline` (`run_options`: trace, on_step, on_token).
        Otherwise the keywords make one request per prompt (`prompt`: str or list; for x2t it is the
        question) and a `LanceOutput` comes back. `generator` (a torch.Generator, or one per prompt)
        gives its `initial_seed()`; with one seed for several prompts, prompt i gets seed + i.
        `callback_on_step_end(pipe, step, timestep, kwargs)` follows every step (timestep: the flow time
        t in (0, 1], None for x2t tokens); raising in it stops the run."""
        if request is not None:
            if not isinstance(request, TaskRequest):
                raise LanceUsageError(f"expected a TaskRequest or keywords (prompt=...), got {type(request).__name__}")
            return super().__call__(request, progress=progress, **run_options)
        if run_options:
            raise LanceUsageError(f"unknown keyword {min(run_options)!r}")
        task = task or self.tasks[0]
        prompts = _prompts(prompt)
        seeds = _seeds(seed, generator, len(prompts))
        images = _per_prompt(image, len(prompts), "image")
        media = {}
        if video is not None:
            from lance_deploy.media.coerce import as_video

            media["video"], media["video_fps"] = as_video(video, fps)
            if media["video_fps"] is None:
                raise LanceUsageError("video: give fps= with frames held in memory (a path gives its own)")
        out = LanceOutput()
        for i, (text, s) in enumerate(zip(prompts, seeds)):
            from lance_deploy.media.coerce import as_image
            from lance_deploy.pipeline.sampler import SamplerConfig

            req = TaskRequest(task=task, seed=s, height=height, width=width, frames=num_frames,
                              image=None if images[i] is None else as_image(images[i]),
                              sampler=SamplerConfig(steps=num_inference_steps, shift=shift, cfg_scale=guidance_scale),
                              max_new_tokens=max_new_tokens, **media)
            if task in UNDERSTANDING_TASKS:
                req.question, req.system = text, system
            else:
                req.prompt, req.negative_prompt = text, negative_prompt
            result = super().__call__(req, progress=progress, on_step=_step_hook(self, req, callback_on_step_end))
            _collect(out, result)
        return out


def _prompts(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise LanceUsageError(f"prompt: expected a string or a non-empty list of strings, got {type(prompt).__name__}"
                          + (" (with non-strings)" if isinstance(prompt, (list, tuple)) and prompt else ""))


def _seeds(seed, generator, n: int) -> list[int]:
    if seed is not None and generator is not None:
        raise LanceUsageError("give seed= or generator=, not both")
    if generator is not None:
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        if not all(hasattr(g, "initial_seed") for g in gens):
            raise LanceUsageError("generator: expected a torch.Generator (or a list of them)")
        seed = [int(g.initial_seed()) for g in gens] if len(gens) > 1 else int(gens[0].initial_seed())
    if seed is None:
        seed = 42
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise LanceUsageError(f"seed/generator: {len(seed)} given for {n} prompts; give one, or one per prompt")
        return list(seed)
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise LanceUsageError(f"seed {seed!r}: expected a whole number")
    return [int(seed) + i for i in range(n)]


def _per_prompt(image, n: int, name: str) -> list:
    if isinstance(image, (list, tuple)):
        if len(image) != n:
            raise LanceUsageError(f"{name}: {len(image)} given for {n} prompts; give one, or one per prompt")
        return list(image)
    return [image] * n


def _step_hook(pipe, req: TaskRequest, callback):
    if callback is None:
        return None
    if not callable(callback):
        raise LanceUsageError(f"callback_on_step_end: expected a function, got {type(callback).__name__}")
    times = None
    if req.task not in UNDERSTANDING_TASKS:
        from lance_deploy.pipeline.sampler import flow_schedule

        times = flow_schedule(req.sampler.steps, req.sampler.shift)[0].tolist()

    def hook(done: int, total: int) -> None:
        callback(pipe, done - 1, None if times is None else times[done - 1], {"step": done, "total": total})

    return hook


def _collect(out: LanceOutput, result) -> None:
    out.outputs.append(result)
    out.meta.append(result.meta)
    if hasattr(result, "text"):
        out.text.append(result.text)
        return
    out.frames.append(result.frames)
    if result.frames.shape[0] == 1:
        from PIL import Image

        out.images.append(Image.fromarray(result.frames[0]))
