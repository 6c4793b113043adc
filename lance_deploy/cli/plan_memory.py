"""`lance-deploy memory-plan`: predicted GPU memory per phase and the residency plan for one task.

Reads only headers and configs (no tensor data), so it plans the full-size release on any machine:

    lance-deploy memory-plan --model ckpt --task t2v --height 480 --width 848 --frames 121 --gpu-memory 16GiB

Exit status 0 when the plan fits, 2 (with a one-line suggestion on stderr) when nothing fits.
The stage function is `planning.request.plan_memory`; `run` calls it before loading anything.
"""

from __future__ import annotations

import click

from lance_deploy.cli.common import LanceCommand, echo_json
from lance_deploy.cli.presets import PRESET_OPTION, apply_plan_preset
from lance_deploy.core.tasks import TASKS
from lance_deploy.core.units import format_bytes as fmt_bytes
from lance_deploy.planning.memory_plan import MemoryPlan
from lance_deploy.planning.planner import MARKER_POLICIES
from lance_deploy.planning.request import DTYPES, plan_memory
from lance_deploy.planning.weights import RECIPES

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


@click.command("memory-plan", cls=LanceCommand, epilog="""\b
Examples:
  lance-deploy memory-plan --model ckpt --task t2i --gpu-memory 8GiB
  lance-deploy memory-plan --model ckpt --task t2v --height 480 --width 848 --frames 121 --gpu-memory 16GiB
  lance-deploy memory-plan --model ckpt --task video_edit --frames 69 --gpu-memory 12GiB --weights int8 --json
  lance-deploy memory-plan --model ckpt --task t2v --frames 121 --preset rtx4090
""")
@click.option("--model", "model_path", required=True, type=click.Path(), help="Download folder, model folder or quantized artifact folder.")
@click.option("--task", required=True, type=click.Choice(TASKS), help="The task to plan.")
@click.option("--height", type=int, help="Output height (t2i/t2v) or the input's height (media tasks).")
@click.option("--width", type=int, help="Output width (t2i/t2v) or the input's width (media tasks).")
@click.option("--frames", type=int, help="Output frames (t2v/i2v) or the input clip's frames at 12 fps.")
@click.option("--gpu-memory", help="Budget, e.g. 16GiB, 12GB, 8000MiB (default: free memory - 1 GiB).")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(tuple(DTYPES)),
              help="Load dtype of the unquantized weights and the activations.")
@click.option("--cfg", type=float, default=4.0, show_default=True, help="Text CFG scale (<= 1: one KV cache).")
@click.option("--steps", type=int, default=30, show_default=True, help="Denoising steps.")
@click.option("--weights", "recipe", type=click.Choice(RECIPES),
              help="Plan with expert Linear weights packed this way (a release; an artifact has its own).")
@click.option("--vae-tiling", "tiling", default="auto", show_default=True, type=click.Choice(("auto", "on", "off")),
              help="Plan the VAE in spatial tiles: auto (above the size the VAE tiles at), on or off.")
@click.option("--resolution", "resolution", help="Input preset of media tasks (default: the task's).")
@click.option("--prompt-tokens", type=int, default=256, show_default=True, help="Assumed caption length.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="x2t decode budget.")
@MARKERS_OPTION
@click.option("--vit", type=click.Path(), help="Qwen2.5-VL-ViT folder (default: beside the model).")
@click.option("--vae", type=click.Path(), help="Wan2.2_VAE.pth (default: beside the model).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@PRESET_OPTION
@click.pass_context
def memory_plan_cmd(ctx, model_path, task, height, width, frames, gpu_memory, dtype, cfg, steps, recipe, tiling,
                    resolution, prompt_tokens, max_new_tokens, markers, vit, vae, as_json, gpu_preset):
    """Predict peak GPU memory per phase of TASK and plan what stays resident."""
    gpu_memory, markers, recipe, chosen = apply_plan_preset(ctx, gpu_preset, model_path, gpu_memory, markers, recipe)
    mp = plan_memory(model_path, task, height, width, frames, gpu_memory, cfg, dtype, tiling, recipe=recipe,
                     steps=steps, preset=resolution, caption_tokens=prompt_tokens, max_new_tokens=max_new_tokens,
                     vit=vit, vae=vae, markers=markers)
    if as_json:
        echo_json({**mp.to_dict(), **({"preset": chosen} if chosen else {})})
    else:
        if chosen:
            click.echo(f"note: {chosen['note']}", err=True)
        click.echo(render(mp))
    if not mp.fits:
        click.echo(f"Error: {mp.suggestion}", err=True)
        ctx.exit(2)
