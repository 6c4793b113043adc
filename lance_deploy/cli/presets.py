"""`--preset rtx4090|...` on `run` and `memory-plan`: fill the budget and the marker policy from
the GPU table (`planning.gpus`), let explicit flags win, and say what was chosen.

The preset's recipe can only be *advice* to `run`: `run --model` takes a release (loaded at its
own precision) or a quantized artifact (which carries its own recipe). So on a release `run`
prints the `quantize` command that makes the preset's artifact; `memory-plan` plans a release as
that recipe's `--weights` packing would (an artifact is planned from its manifest).
"""

from __future__ import annotations

import click

from lance_deploy.core import progress
from lance_deploy.planning.gpus import PRESET_NAMES

PRESET_OPTION = click.option(
    "--preset", "gpu_preset", type=click.Choice(PRESET_NAMES),
    help="GPU preset: the budget (--gpu-memory), --markers and the recipe for this card, from "
         "recipes/presets/gpus.yaml; explicit flags win.")


def _explicit(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src != click.core.ParameterSource.DEFAULT


def _say(as_json: bool, text: str) -> None:
    if as_json:
        progress.emit("note", message=text)
    else:
        click.echo(f"note: {text}", err=True)


def apply_preset(ctx: click.Context, name: str | None, model_path, gpu_memory, markers, as_json: bool):
    """(gpu_memory, markers, chosen) for `run`: `chosen` is the JSON-able record of the preset's
    choices (None without --preset)."""
    if name is None:
        return gpu_memory, markers, None
    from lance_deploy.artifact.load import is_artifact
    from lance_deploy.planning.gpus import preset

    p = preset(name)
    chosen = p.to_dict()
    if gpu_memory is None:
        gpu_memory = chosen["budget"]
    if not _explicit(ctx, "markers"):
        markers = p.markers
    chosen.update(gpu_memory=gpu_memory, markers=markers)
    if is_artifact(model_path):
        advice = f"--model is a quantized artifact: its own recipe is used (the preset's is {p.recipe})"
        chosen["recipe_used"] = "artifact"
    else:
        advice = (f"--model is a release, run at its own precision; for the preset's recipe make an artifact: "
                  f"`lance-deploy quantize {model_path} --recipe {p.recipe} --out DIR`, then --model DIR")
        chosen["recipe_used"] = "release"
        chosen["quantize_command"] = f"lance-deploy quantize {model_path} --recipe {p.recipe} --out DIR"
    _say(as_json, f"preset {name} ({p.card}): --gpu-memory {gpu_memory}, --markers {markers}; {advice}")
    return gpu_memory, markers, chosen


def apply_plan_preset(ctx: click.Context, name: str | None, model_path, gpu_memory, markers, weights):
    """(gpu_memory, markers, weights, chosen) for `memory-plan` (chosen: None without --preset)."""
    if name is None:
        return gpu_memory, markers, weights, None
    from lance_deploy.artifact.load import is_artifact
    from lance_deploy.planning.gpus import preset

    p = preset(name)
    chosen = p.to_dict()
    gpu_memory = chosen["budget"] if gpu_memory is None else gpu_memory
    markers = markers if _explicit(ctx, "markers") else p.markers
    artifact = is_artifact(model_path)
    if weights is None and not artifact:
        weights = p.weights
    chosen.update(gpu_memory=gpu_memory, markers=markers, weights=None if artifact else weights)
    how = ("the artifact's own weights" if artifact else
           f"--weights {weights} (how recipe {p.recipe} packs the experts)" if weights else "release weights")
    chosen["note"] = f"preset {name} ({p.card}): --gpu-memory {gpu_memory}, --markers {markers}, planned with {how}"
    return gpu_memory, markers, weights, chosen
