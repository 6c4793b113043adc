"""What to change when a request does not fit: one line, with the numbers that make it concrete.

Tried in this order, each by re-planning the changed request: a smaller recipe for the expert
weights (quoting the bytes it saves), VAE tiling (when a VAE phase is the one over budget), a
shorter video or a smaller size / resolution preset, and always the minimum budget that fits.
"""

from __future__ import annotations

from dataclasses import replace

from lance_deploy.core.tasks import INPUT_VIDEO_TASKS, OUTPUT_FRAME_TASKS
from lance_deploy.core.units import format_bytes
from lance_deploy.media.preprocess import PRESETS
from lance_deploy.pipeline.tasks import SPECS
from lance_deploy.planning.planner import Plan
from lance_deploy.planning.weights import EXPERTS, RECIPES, WeightInventory


def gib(n: int, up: bool = False) -> str:
    return format_bytes(n, digits=1, round_up=up)


# the shipped quantize recipe that gives each hypothetical weight format
SHIPPED_RECIPE = {"fp8": "fp8-rtn", "int8": "int8-rtn", "int4": "budget-8gb"}


def _weights_hint(name: str, saved: int) -> str:
    # names options of both commands that print advice: memory-plan plans it, quantize makes it
    return (f"{name} expert weights (-{gib(saved)}: `lance-deploy quantize MODEL --recipe {SHIPPED_RECIPE[name]}`; "
            f"memory-plan --weights {name})")


def _expert_bytes(inv: WeightInventory) -> int:
    return sum(inv.components.get(e, 0) for e in EXPERTS)


def _recipe(info, r, inv, replan, extra: dict) -> str | None:
    """The first recipe (fp8, int8, int4, after the current one) that fits, with what it saves."""
    start = RECIPES.index(r.recipe) + 1 if r.recipe in RECIPES else 0
    last = None
    for name in RECIPES[start:]:
        p = replan(replace(r, recipe=name, **extra))
        saved = _expert_bytes(inv) - _expert_bytes(info.inventory(r.task, r.dtype, name))
        if p.fits:
            return _weights_hint(name, saved) + (" with --vae-tiling on" if extra else "")
        last = (name, saved, p.min_budget)
    if last is None:
        return None
    name, saved, need = last
    return f"{_weights_hint(name, saved)} with --gpu-memory {gib(need, up=True)}"


def _smaller(r, replan) -> str | None:
    """The largest smaller size (frames, then area / preset) that fits."""
    work_frames = r.frames
    if r.task in OUTPUT_FRAME_TASKS + INPUT_VIDEO_TASKS:
        top = work_frames or (121 if r.task == "t2v" else 61 if r.task == "i2v" else 69)
        for f in range((top - 1) // 4 * 4 + 1 - 4, 0, -4):
            if replan(replace(r, frames=f)).fits:
                what = "--frames" if r.task in OUTPUT_FRAME_TASKS else "an input clip of at most"
                return f"{what} {f}" + ("" if r.task in OUTPUT_FRAME_TASKS else " frames (after 12 fps sampling)")
    if r.task in ("t2i", "t2v"):
        h, w = r.height or (768 if r.task == "t2i" else 480), r.width or (768 if r.task == "t2i" else 848)
        for s in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
            hh, ww = max(16, round(h * s / 16) * 16), max(16, round(w * s / 16) * 16)
            if replan(replace(r, height=hh, width=ww)).fits:
                return f"--height {hh} --width {ww}"
        return None
    if SPECS[r.task].media:  # media tasks: the bucket area comes from the preset, not the input size
        current = PRESETS[r.preset].vae_side if r.preset else None
        for name, p in sorted(PRESETS.items(), key=lambda kv: -kv[1].vae_side):
            if current is not None and p.vae_side >= current:
                continue
            if replan(replace(r, preset=name)).fits:
                return f"--resolution {name}"
    return None


def suggest(info, r, p: Plan, inv: WeightInventory, replan) -> str:
    """One line: which phases are over, and the changes that would make the request fit."""
    over = [x for x in p.phases if x.total > r.budget]
    needs = ", ".join(f"{x.name} needs at least {gib(p.phase_min[x.name], up=True)}"
                      + (" (every expert layer streamed)" if x.layers else "") for x in over)
    options: list[str | None] = []
    tiling = {}
    vae_over = [x.name for x in over if x.name in ("vae_decode", "encode_vae")]
    if vae_over and r.tiling is not True:
        tiled = replan(replace(r, tiling=True))
        if any(tiled.phase_min[n] < p.phase_min[n] for n in vae_over):  # not already tiled by auto
            tiling = {"tiling": True}
            if tiled.fits:
                options.append("--vae-tiling on")
    if not options and any(x.layers for x in over):
        options.append(_recipe(info, r, inv, replan, tiling))
    smaller = _smaller(replace(r, **tiling), replan)
    if smaller:
        options.append(smaller + (" with --vae-tiling on" if tiling else ""))
    options.append(f"--gpu-memory {gib(p.min_budget, up=True)}")
    return f"does not fit in {gib(r.budget)}: {needs}; try " + ", or ".join(o for o in options if o)
