"""Run the reference model on calibration prompts and record its backbone programs.

Edit and understanding calibration need media: the model makes its own, turning t2i (or t2v)
prompts into images (videos) that then serve as edit sources and understanding inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lance_deploy.calibrate.config import CalibrationConfig
from lance_deploy.calibrate.prompt_sets import load_prompt_set, select
from lance_deploy.calibrate.record import Program, recording
from lance_deploy.core.progress import bar
from lance_deploy.core.tasks import UNDERSTANDING_TASKS
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import OUTPUT_FRAME_TASKS, VIDEO_TASKS, TaskRequest

TEXT_FIELD = {"t2i": "prompt", "t2v": "prompt", "i2v": "prompt", "image_edit": "instruction",
              "video_edit": "instruction", "x2t_image": "question", "x2t_video": "question"}


@dataclass(frozen=True)
class CollectSettings:
    """What the reference runs look like (sizes small enough to calibrate fast, large enough to be real)."""

    tasks: tuple[str, ...]
    samples_per_task: int
    steps: int = 30
    keep_steps: tuple[int, ...] | None = None  # denoising steps whose queries are recorded (None = all)
    cfg_branches: tuple[str, ...] = ("cond", "uncond")
    height: int = 256
    width: int = 256
    frames: int = 9
    seed: int = 0
    prompts_root: str = "calibration"


class _Media:
    """Images/videos made by the model itself from t2i/t2v prompts, cached per index."""

    def __init__(self, loader, s: CollectSettings):
        self.loader, self.s, self.cache = loader, s, {}

    def get(self, kind: str, i: int, progress: bool) -> np.ndarray:
        key = (kind, i)
        if key not in self.cache:
            task = "t2i" if kind == "image" else "t2v"
            prompts = select(load_prompt_set(task, self.s.prompts_root), self.s.samples_per_task, self.s.seed)
            req = TaskRequest(task=task, prompt=prompts[i % len(prompts)]["prompt"], height=self.s.height,
                              width=self.s.width, frames=None if task == "t2i" else self.s.frames,
                              sampler=SamplerConfig(steps=min(self.s.steps, 10)), seed=self.s.seed + i)
            out = self.loader(task)(req, progress=progress)
            self.cache[key] = out.frames[0] if kind == "image" else out.frames
        return self.cache[key]


def _request(task: str, entry: dict, i: int, s: CollectSettings, media: _Media, progress: bool) -> TaskRequest:
    req = TaskRequest(task=task, seed=s.seed + i, sampler=SamplerConfig(steps=s.steps),
                      height=s.height, width=s.width, frames=s.frames if task in OUTPUT_FRAME_TASKS else None,
                      preset="image_256res" if task not in VIDEO_TASKS else "video_192p", max_new_tokens=16)
    text = entry[TEXT_FIELD[task]]
    if task.startswith("x2t"):
        req.question = text
    else:
        req.prompt = text
    if task in ("i2v", "image_edit", "x2t_image"):
        req.image = media.get("image", i, progress)
    elif task in ("video_edit", "x2t_video"):
        req.video, req.video_fps = media.get("video", i, progress), 12.0
    return req


@dataclass(frozen=True)
class Probe:
    """The first run of each task, timed: what a time estimate of the whole collection scales."""

    seconds: dict[str, float]  # task -> seconds of its first run (media it needed included)
    programs: list[Program]  # those runs' programs, one per task, in task order


class _Recorded(Exception):
    """Raised from `on_step` once the last kept denoising step has run: the rest of the run (the
    later steps and the VAE decode) records nothing."""


def _record(pipe: LancePipeline, req: TaskRequest, s: CollectSettings, keep: set[int]) -> Program:
    stop_after = max(keep, default=-1) + 1 if req.task not in UNDERSTANDING_TASKS else None

    def on_step(done: int, total: int) -> None:
        if done == stop_after:
            raise _Recorded

    with recording(pipe.c.lm, req.task, keep_step=lambda k: k in keep,
                   keep_cache=lambda c: c == 0 or "uncond" in s.cfg_branches) as program:
        try:
            pipe(req, progress=False, on_step=None if stop_after is None else on_step)
        except _Recorded:
            pass
    return program


def collect_programs(model_path, s: CollectSettings, *, device="cpu", dtype="float32", progress=False,
                     on_probe: Callable[[Probe], None] | None = None) -> list[Program]:
    """Record one program per (task, prompt); returns them in task order.

    The first prompt of every task runs first; `on_probe` then gets their timings (for an
    estimate of the rest) before the other runs start."""
    media_tasks = {"t2i"} if any(t in ("i2v", "image_edit", "x2t_image") for t in s.tasks) else set()
    media_tasks |= {"t2v"} if any(t in ("video_edit", "x2t_video") for t in s.tasks) else set()
    pipe = LancePipeline.from_path(model_path, tuple(s.tasks) + tuple(sorted(media_tasks)), device=device,
                                   dtype=dtype)

    def loader(task: str) -> LancePipeline:
        return pipe

    media = _Media(loader, s)
    keep = set(range(s.steps)) if s.keep_steps is None else set(s.keep_steps)
    entries = {t: select(load_prompt_set(t, s.prompts_root), s.samples_per_task, s.seed) for t in s.tasks}
    first = [(t, 0) for t in s.tasks if entries[t]]
    order = first + [(t, i) for t in s.tasks for i in range(1, len(entries[t]))]
    programs: dict[tuple[str, int], Program] = {}
    seconds: dict[str, float] = {}
    with bar(len(order), "calibration runs", unit="run", enabled=progress) as b:
        for n, (task, i) in enumerate(order):
            start = time.perf_counter()
            programs[task, i] = _record(pipe, _request(task, entries[task][i], i, s, media, progress=False), s, keep)
            if i == 0:
                seconds[task] = time.perf_counter() - start
            if b is not None:
                b.update(1)
            if on_probe is not None and n + 1 == len(first) < len(order):
                on_probe(Probe(dict(seconds), [programs[k] for k in first]))
    return [programs[t, i] for t in s.tasks for i in range(len(entries[t]))]


def collect_calibration(layout, c: CalibrationConfig, device, progress: bool,
                        on_probe: Callable[[Probe], None] | None = None) -> list[Program]:
    """Record the programs of a recipe's calibration config `c` for the model of `layout` (a
    ReleaseLayout; video tasks only on the video variant)."""
    tasks = tuple(t for t in c.tasks if layout.variant == "video" or t not in VIDEO_TASKS)
    settings = CollectSettings(tasks=tasks, samples_per_task=c.samples_per_task, steps=c.steps,
                               keep_steps=tuple(c.step_indices()), cfg_branches=tuple(c.cfg_branches),
                               height=c.height, width=c.width, frames=c.frames, seed=c.seed,
                               prompts_root=c.prompts_dir)
    return collect_programs(layout.model_dir, settings, device=device, dtype="float32", progress=progress,
                            on_probe=on_probe)
