"""`lance-deploy calibrate`, `quantize` and `eval`: thin wrappers over the stage functions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from lance_deploy.cli.common import echo_json

RECIPE_HELP = "A shipped recipe name (see recipes/) or a YAML file."


def _recipe(name: str, samples: int | None):
    from lance_deploy.quant.recipe import load_recipe

    recipe = load_recipe(name)
    if samples is not None and recipe.calibration is not None:
        recipe = recipe.replace(calibration=dataclasses.replace(recipe.calibration, samples_per_task=samples))
    return recipe


@click.command("calibrate", epilog="""\b
Examples:
  lance-deploy calibrate ckpt/Lance_3B --recipe budget-8gb --work exported/budget-8gb.job
""")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--recipe", "-r", required=True, help=RECIPE_HELP)
@click.option("--work", "work_dir", type=click.Path(path_type=Path), required=True, help="Job folder.")
@click.option("--samples", type=int, help="Override calibration.samples_per_task.")
@click.option("--device", default="auto", show_default=True)
@click.option("--restart", is_flag=True, help="Discard a job folder made with other settings.")
@click.option("--json", "as_json", is_flag=True)
def calibrate_cmd(ckpt, recipe, work_dir, samples, device, restart, as_json):
    """Record the calibration programs of RECIPE into a job folder that `quantize --work` resumes."""
    from lance_deploy.pipeline.pipeline import resolve_device
    from lance_deploy.quant.quantize import calibrate

    summary = calibrate(ckpt, _recipe(recipe, samples), work_dir, device=resolve_device(device), restart=restart,
                        progress=not as_json)
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"calibrated: {summary}")


@click.command("quantize", epilog="""\b
Examples:
  lance-deploy quantize ckpt/Lance_3B --recipe fp8-ada-hopper --out exported/lance-fp8
  lance-deploy quantize ckpt/Lance_3B_Video --recipe budget-12gb --out exported/video-12gb --json
  lance-deploy plan ckpt/Lance_3B --recipe budget-8gb          # see the per-tensor plan first
""")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--recipe", "-r", required=True, help=RECIPE_HELP)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Artifact folder.")
@click.option("--work", "work_dir", type=click.Path(path_type=Path), help="Job folder (default: OUT.job).")
@click.option("--vit", type=click.Path(path_type=Path))
@click.option("--vae", type=click.Path(path_type=Path))
@click.option("--samples", type=int, help="Override calibration.samples_per_task.")
@click.option("--device", default="auto", show_default=True)
@click.option("--restart", is_flag=True, help="Discard a job folder made with other settings.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact at OUT.")
@click.option("--json", "as_json", is_flag=True)
def quantize_cmd(ckpt, recipe, out_dir, work_dir, vit, vae, samples, device, restart, overwrite, as_json):
    """Quantize the release checkpoint CKPT with RECIPE into an artifact folder (resumable)."""
    from lance_deploy.pipeline.pipeline import resolve_device
    from lance_deploy.quant.quantize import quantize

    res = quantize(ckpt, _recipe(recipe, samples), out_dir, work_dir=work_dir, vit=vit, vae=vae,
                   device=resolve_device(device), restart=restart, overwrite=overwrite, progress=not as_json)
    summary = {"out": str(res.out_dir), "seconds": round(res.seconds, 2), "resumed_layers": res.resumed_layers,
               "bytes": res.plan.total_bytes, "bf16_bytes": res.plan.bf16_bytes, "calibration": res.calibration}
    if as_json:
        echo_json(summary)
        return
    click.echo(f"wrote {res.out_dir} ({res.plan.total_bytes / 2**30:.2f} GiB of weights, "
               f"{res.plan.bf16_bytes / 2**30:.2f} GiB in bf16) in {res.seconds:.1f} s"
               + (f", {res.resumed_layers} layers resumed" if res.resumed_layers else ""))


@click.command("eval", epilog="""\b
Examples:
  lance-deploy eval --reference ckpt/Lance_3B --model exported/lance-fp8 --out exported/lance-fp8/report
""")
@click.option("--reference", type=click.Path(path_type=Path), required=True, help="Full-precision checkpoint.")
@click.option("--model", "model", type=click.Path(path_type=Path), required=True, help="Quantized artifact.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Report folder (default: MODEL/report).")
@click.option("--tasks", default="t2i,x2t_image", show_default=True, help="Comma-separated tasks.")
@click.option("--samples", type=int, default=4, show_default=True, help="Held-out prompts per task.")
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--size", type=int, default=64, show_default=True, help="Generation height = width.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(reference, model, out_dir, tasks, samples, steps, size, device, as_json):
    """Compare a quantized artifact with its reference on held-out prompts (markdown + JSON report)."""
    from lance_deploy.quant.report import run_eval

    report = run_eval(reference, model, out_dir or Path(model) / "report", tasks=tuple(tasks.split(",")),
                      samples=samples, steps=steps, size=size, device=device, progress=not as_json)
    if as_json:
        echo_json(report)
    else:
        click.echo(f"wrote {report['markdown']}")
