"""`lance-deploy memory-plan`: predicted GPU memory per phase and the residency plan for one task.

Reads only headers and configs (no tensor data), so it plans the full-size release on any machine:

    lance-deploy memory-plan --model ckpt --task t2v --height 480 --width 848 --frames 121 --gpu-memory 16GiB

Exit status 0 when the plan fits, 2 (with a one-line suggestion on stderr) when nothing fits.
`plan_memory()` is the same thing as a function; `run` can call it before loading anything.
"""

from __future__ import annotations

import re

import click
import torch

from lance_deploy.errors import LanceError, LanceUsageError
from lance_deploy.pipeline.tasks import TASKS
from lance_deploy.runtime.memory_plan import MemoryPlan, ModelInfo, PlanRequest, fmt_bytes, make_plan
from lance_deploy.runtime.planner import MARKER_POLICIES, GiB
from lance_deploy.runtime.weights import RECIPES

MARGIN = GiB  # left free under the device's free memory when no budget is given
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_size(text, option: str = "--gpu-memory") -> int:
    """'16GiB', '12GB', '8000MiB', '7.5GiB' or a plain byte count -> bytes; errors name `option`."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise LanceUsageError(f"{option} {text!r}: expected a size like 16GiB, 12GB, 8000MiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise LanceUsageError(f"{option} {text!r}: must be positive")
    return value


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
                max_new_tokens: int = 256, vit=None, vae=None, markers: str = "auto") -> MemoryPlan:
    """Plan `task` on the release (or quantized artifact folder) at `model` under `gpu_memory`
    (bytes or '16GiB'; default: free device memory minus 1 GiB). Reads headers, configs and an
    artifact's manifest only."""
    if task not in TASKS:
        raise LanceUsageError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    dt = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype)
    if dt is None:
        raise LanceUsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if recipe is not None and recipe not in RECIPES:
        raise LanceUsageError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    budget = default_budget() if gpu_memory is None else parse_size(gpu_memory)
    info = ModelInfo.load(model, task, vit=vit, vae=vae)
    req = PlanRequest(task, budget, height, width, frames, cfg=cfg, steps=steps, dtype=dt, recipe=recipe,
                      tiling=_tiling(tiling), flash=_flash_default() if flash is None else flash,
                      caption_tokens=caption_tokens, max_new_tokens=max_new_tokens, preset=preset,
                      markers=markers)
    return make_plan(info, req)


MARKERS_OPTION = click.option(
    "--markers", type=click.Choice(MARKER_POLICIES), default="auto", show_default=True,
    help="When the und expert does not fit while denoising, how its 2 marker rows are served: stream its layers "
         "per step (exact), a resident int8/int4 copy, or auto (the copy only where streaming would slow a step "
         "by more than 10%).")

COLUMNS = ("weights", "buffers", "kv", "activations", "vae", "carried", "overhead", "total")


def render(mp: MemoryPlan) -> str:
    """The human table: one row per phase, then the plan summary."""
    r, w, p, inv = mp.request, mp.workload, mp.plan, mp.inventory
    size = (f"target {'x'.join(map(str, w.target_grid))} latents = {w.target_tokens:,} tokens; "
            if w.target_grid else "")
    vit = f"ViT {w.vit_tokens:,} tokens; " if w.vit_grid else ""
    lines = [f"memory-plan {r.task}: {size}{vit}context {w.context_tokens:,}"
             + (f" / uncond {w.uncond_context_tokens:,}" if w.cfg else "") + f" tokens; {inv.recipe}",
             "weights: " + ", ".join(f"{c} {fmt_bytes(b)}" + (" (host)" if c == "embed_tokens" else "")
                                     for c, b in inv.components.items() if b),
             f"{'phase':<12}" + "".join(f"{c:>12}" for c in COLUMNS) + "  residency"]
    for x in p.phases:
        cells = [x.weights, x.buffers, x.kv, x.activations, x.vae, x.carried, x.overhead, x.total]
        mark = "" if x.total <= r.budget else " !"
        lines.append(f"{x.name:<12}" + "".join(f"{fmt_bytes(v):>12}" for v in cells) + f"  {x.describe()}{mark}")
        if x.streamed_bytes:
            lines.append(f"{'':<12}  streams {fmt_bytes(x.streamed_bytes)} over {x.forwards} forwards "
                         f"(~{x.transfer_s:.1f} s of PCIe at 25 GB/s)")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"peak {fmt_bytes(p.peak.total)} in {p.peak.name}; {verdict} in {fmt_bytes(r.budget)} "
                 f"(minimum {fmt_bytes(p.min_budget)}, every expert layer streamed)")
    if p.marker_mode():
        lines.append(f"denoise marker tokens: {p.marker_mode()}")
    lines += [f"note: {n}" for n in mp.notes + list(w.notes)]
    return "\n".join(lines)


@click.command("memory-plan", epilog="""\b
Examples:
  lance-deploy memory-plan --model ckpt --task t2i --gpu-memory 8GiB
  lance-deploy memory-plan --model ckpt --task t2v --height 480 --width 848 --frames 121 --gpu-memory 16GiB
  lance-deploy memory-plan --model ckpt --task video_edit --frames 69 --gpu-memory 12GiB --recipe int8 --json
""")
@click.option("--model", "model_path", required=True, type=click.Path(), help="Download folder, model folder or quantized artifact folder.")
@click.option("--task", required=True, type=click.Choice(TASKS), help="The task to plan.")
@click.option("--height", type=int, help="Output height (t2i/t2v) or the input's height (media tasks).")
@click.option("--width", type=int, help="Output width (t2i/t2v) or the input's width (media tasks).")
@click.option("--frames", type=int, help="Output frames (t2v/i2v) or the input clip's frames at 12 fps.")
@click.option("--gpu-memory", help="Budget, e.g. 16GiB, 12GB, 8000MiB (default: free memory - 1 GiB).")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(tuple(DTYPES)))
@click.option("--cfg", type=float, default=4.0, show_default=True, help="Text CFG scale (<= 1: one KV cache).")
@click.option("--steps", type=int, default=30, show_default=True, help="Denoising steps.")
@click.option("--recipe", type=click.Choice(RECIPES), help="Plan with expert Linear weights packed this way.")
@click.option("--vae-tiling", "tiling", default="auto", show_default=True, type=click.Choice(("auto", "on", "off")))
@click.option("--resolution", "preset", help="Input preset of media tasks (default: the task's).")
@click.option("--prompt-tokens", type=int, default=256, show_default=True, help="Assumed caption length.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="x2t decode budget.")
@MARKERS_OPTION
@click.option("--vit", type=click.Path(), help="Qwen2.5-VL-ViT folder (default: beside the model).")
@click.option("--vae", type=click.Path(), help="Wan2.2_VAE.pth (default: beside the model).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def memory_plan_cmd(ctx, model_path, task, height, width, frames, gpu_memory, dtype, cfg, steps, recipe, tiling,
                    preset, prompt_tokens, max_new_tokens, markers, vit, vae, as_json):
    """Predict peak GPU memory per phase of TASK and plan what stays resident."""
    from lance_deploy.cli.common import echo_json

    try:
        mp = plan_memory(model_path, task, height, width, frames, gpu_memory, cfg, dtype, tiling, recipe=recipe,
                         steps=steps, preset=preset, caption_tokens=prompt_tokens, max_new_tokens=max_new_tokens,
                         vit=vit, vae=vae, markers=markers)
    except LanceError as e:  # one line, also when the command runs outside the `lance-deploy` group
        click.echo(f"Error: {e}", err=True)
        ctx.exit(e.exit_code)
    if as_json:
        echo_json(mp.to_dict())
    else:
        click.echo(render(mp))
    if not mp.fits:
        click.echo(f"Error: {mp.suggestion}", err=True)
        ctx.exit(2)
