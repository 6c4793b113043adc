"""Plan one request from headers and configs: the stage function behind `memory-plan` and `run --gpu-memory`.

Reads no tensor data, so it plans the full-size release on any machine.
"""

from __future__ import annotations

import torch

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.tasks import TASKS
from lance_deploy.core.units import GiB, parse_size
from lance_deploy.planning.memory_plan import MemoryPlan, ModelInfo, PlanRequest, make_plan
from lance_deploy.planning.weights import RECIPES

MARGIN = GiB  # left free under the device's free memory when no budget is given
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}



def default_budget() -> int:
    """Free device memory minus a 1 GiB margin; there is no default without CUDA."""
    if not torch.cuda.is_available():
        raise LanceUsageError("--gpu-memory is required: no CUDA device here to read free memory from")
    free, _ = torch.cuda.mem_get_info()
    return max(free - MARGIN, 0)


def _flash_default() -> bool:
    # Plans are for a flash-capable GPU unless this machine's GPU is older than sm80.
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0)


def _tiling(value) -> bool | None:
    table = {None: None, "auto": None, "on": True, "off": False, True: True, False: False}
    if value not in table:
        raise LanceUsageError(f"--vae-tiling {value!r}: expected auto, on or off")
    return table[value]


def plan_memory(model, task: str, height: int | None = None, width: int | None = None, frames: int | None = None,
                gpu_memory=None, cfg: float = 4.0, dtype="bfloat16", tiling=None, *, recipe: str | None = None,
                steps: int = 30, preset: str | None = None, flash: bool | None = None, caption_tokens: int = 256,
                question_tokens: int = 64, max_new_tokens: int = 256, vit=None, vae=None, markers: str = "auto",
                negative_tokens: int = 0) -> MemoryPlan:
    """Plan `task` on the release (or quantized artifact folder) at `model` under `gpu_memory`
    (bytes or '16GiB'; default: free device memory minus 1 GiB). Reads headers, configs and an
    artifact's manifest only."""
    if task not in TASKS:
        raise LanceUsageError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    dt = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype)
    if dt is None:
        raise LanceUsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if recipe is not None and recipe not in RECIPES:
        raise LanceUsageError(f"--weights {recipe!r}: expected one of {', '.join(RECIPES)}")
    budget = default_budget() if gpu_memory is None else parse_size(gpu_memory)
    info = ModelInfo.load(model, task, vit=vit, vae=vae)
    req = PlanRequest(task, budget, height, width, frames, cfg=cfg, steps=steps, dtype=dt, recipe=recipe,
                      tiling=_tiling(tiling), flash=_flash_default() if flash is None else flash,
                      caption_tokens=caption_tokens, question_tokens=question_tokens, max_new_tokens=max_new_tokens,
                      preset=preset, markers=markers, negative_tokens=negative_tokens)
    return make_plan(info, req)






NEGATIVE_TOKENS = 256  # a negative prompt is planned at the caption's assumed length (plan_memory's default)


def plan_residency(path, req, gpu_memory, dtype: torch.dtype, *, vit=None, vae=None,
                   markers: str = "auto") -> MemoryPlan:
    """The planner's `MemoryPlan` for a `pipeline.tasks.TaskRequest` under `gpu_memory` (headers
    and configs only; for a quantized artifact folder, its manifest's stored bytes). Raises
    LanceUsageError with the planner's suggestion when nothing fits."""
    s = req.sampler
    mp = plan_memory(path, req.task, req.height, req.width, req.frames, gpu_memory, cfg=s.cfg_scale, dtype=dtype,
                     steps=s.steps, preset=req.preset, max_new_tokens=req.max_new_tokens, vit=vit, vae=vae,
                     markers=markers, negative_tokens=NEGATIVE_TOKENS if req.negative_prompt else 0)
    if not mp.fits:
        raise LanceUsageError(f"--gpu-memory: {mp.suggestion}")
    return mp
