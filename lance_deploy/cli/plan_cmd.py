"""`lance-deploy plan CKPT --recipe R`: the resolved per-tensor quantization plan, from headers only."""

from __future__ import annotations

import click

from lance_deploy.cli.common import echo_json


@click.command("plan", epilog="""\b
Examples:
  lance-deploy plan ~/models/Lance/Lance_3B --recipe budget-12gb
  lance-deploy plan ~/models/Lance --recipe my-recipe.yaml --json
""")
@click.argument("ckpt", type=click.Path(path_type=str))
@click.option("--recipe", "-r", "recipe_name", required=True,
              help="A shipped recipe name (fp8-ada-hopper, int8-ampere, budget-16gb, budget-12gb, budget-8gb) "
                   "or a recipe YAML path.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--variant", type=click.Choice(["image", "video"]), default=None,
              help="In a download folder: which model (default: Lance_3B when both are present).")
@click.option("--vit", type=click.Path(path_type=str), default=None,
              help="Qwen2.5-VL-ViT folder or vit.safetensors (default: found beside the model folder).")
@click.option("--vae", type=click.Path(path_type=str), default=None,
              help="Wan2.2_VAE.pth (default: found beside the model folder).")
def plan_cmd(ckpt: str, recipe_name: str, as_json: bool, variant: str | None, vit: str | None,
             vae: str | None) -> None:
    """Print which format, algorithm and rule each tensor gets, and the projected bytes.

    Rules are tried in order and the first match wins; every Linear weight must match one. A rule
    that matches no tensor is a warning here (and in --json's "warnings"); quantize refuses it
    unless --allow-unmatched.
    Only file headers are read, so this is instant even for the full release.
    """
    from lance_deploy.quant.plan import format_plan, plan_checkpoint, plan_to_dict
    from lance_deploy.quant.recipe import load_recipe

    plan = plan_checkpoint(ckpt, load_recipe(recipe_name), vit=vit, vae=vae, variant=variant)
    if as_json:
        echo_json({"checkpoint": ckpt, **plan_to_dict(plan)})
        for w in plan.unmatched_warnings:  # the table prints them itself
            click.echo(f"warning: {w}", err=True)
        return
    click.echo(format_plan(plan))
