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
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N or cpu (auto: cuda if present).")
@click.option("--restart", is_flag=True, help="Discard a job folder made with other settings.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result (progress: JSON lines on stderr).")
@click.option("--quiet", is_flag=True, help="No progress bars and no estimate on stderr.")
def calibrate_cmd(ckpt, recipe, work_dir, samples, device, restart, as_json, quiet):
    """Record the calibration programs of RECIPE into a job folder that `quantize --work` resumes.

    Before most runs start it prints an estimate (programs, recorded calls, time) timed on the
    first run of every task."""
    from lance_deploy.core import progress
    from lance_deploy.pipeline.pipeline import resolve_device
    from lance_deploy.quant.quantize import calibrate

    with progress.use(progress.mode_for(quiet, as_json)):
        summary = calibrate(ckpt, _recipe(recipe, samples), work_dir, device=resolve_device(device), restart=restart,
                            progress=True)
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"calibrated: {summary}")


@click.command("quantize", epilog="""\b
Examples:
  lance-deploy quantize ckpt/Lance_3B --recipe fp8-ada-hopper --out exported/lance-fp8
  lance-deploy quantize ckpt/Lance_3B_Video --recipe budget-12gb --out exported/video-12gb --json
  lance-deploy plan ckpt/Lance_3B --recipe budget-8gb          # see the per-tensor plan first
  lance-deploy quantize ckpt/Lance_3B --recipe budget-12gb --budget 12GiB --out exported/lance-12g
  lance-deploy quantize ckpt --variant video --recipe int8-ampere --out exported/video-int8   # download folder
""")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--recipe", "-r", required=True, help=RECIPE_HELP)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Artifact folder.")
@click.option("--work", "work_dir", type=click.Path(path_type=Path), help="Job folder (default: OUT.job).")
@click.option("--vit", type=click.Path(path_type=Path), help="Qwen2.5-VL-ViT folder (default: beside the model).")
@click.option("--vae", type=click.Path(path_type=Path), help="Wan2.2_VAE.pth (default: beside the model).")
@click.option("--samples", type=int, help="Override calibration.samples_per_task.")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N or cpu (auto: cuda if present).")
@click.option("--restart", is_flag=True, help="Discard a job folder made with other settings.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact at OUT.")
@click.option("--budget", help="Weight byte budget (12GiB, 16GB, ...): measure each layer group's sensitivity and "
                               "choose per-group formats within it (default: the recipe's budget section, if any). "
                               "The chosen recipe and report are written to OUT.budget.yaml / OUT.budget.json.")
@click.option("--allow-unmatched", is_flag=True, help="Quantize even if a rule matches no tensor (see `plan`).")
@click.option("--variant", type=click.Choice(("image", "video")),
              help="In a download folder: Lance_3B (image) or Lance_3B_Video (video); default: the only one, or "
                   "Lance_3B when both are there.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result (progress: JSON lines on stderr).")
@click.option("--quiet", is_flag=True, help="No progress bars and no estimate on stderr.")
def quantize_cmd(ckpt, recipe, out_dir, work_dir, vit, vae, samples, device, restart, overwrite, budget,
                 allow_unmatched, variant, as_json, quiet):
    """Quantize the release checkpoint CKPT with RECIPE into an artifact folder (resumable).

    One run per OUT (and per job folder): a second is refused naming the first one's pid. A run
    killed at any point resumes from the job folder when started again with the same arguments.
    """
    from lance_deploy.core import progress
    from lance_deploy.core.lock import PathLock
    from lance_deploy.pipeline.pipeline import resolve_device
    from lance_deploy.quant.quantize import quantize

    recipe_obj, device, programs = _recipe(recipe, samples), resolve_device(device), None
    ckpt = _model_folder(ckpt, variant, vit, vae)
    # the lock comes before the budget search, which is long and writes beside OUT
    with progress.use(progress.mode_for(quiet, as_json)), PathLock(out_dir, "--out") as lock:
        _check_rules(ckpt, recipe, recipe_obj, vit, vae, allow_unmatched)
        if budget is not None or recipe_obj.budget is not None:
            recipe_obj, programs = _apply_budget(ckpt, recipe_obj, budget, out_dir, vit, vae, device, as_json)
        res = quantize(ckpt, recipe_obj, out_dir, work_dir=work_dir, vit=vit, vae=vae, programs=programs,
                       device=device, restart=restart, overwrite=overwrite, progress=True)
    notes = (lock.note, *res.notes) if lock.note else res.notes
    for note in notes:
        click.echo(f"note: {note}", err=True)
    summary = {"out": str(res.out_dir), "model": str(ckpt), "seconds": round(res.seconds, 2), "resumed_layers": res.resumed_layers,
               "bytes": res.plan.total_bytes, "bf16_bytes": res.plan.bf16_bytes, "calibration": res.calibration,
               "notes": list(notes)}
    if as_json:
        echo_json(summary)
        return
    click.echo(f"wrote {res.out_dir} ({res.plan.total_bytes / 2**30:.2f} GiB of weights, "
               f"{res.plan.bf16_bytes / 2**30:.2f} GiB in bf16) in {res.seconds:.1f} s"
               + (f", {res.resumed_layers} layers resumed" if res.resumed_layers else ""))


def _model_folder(ckpt: Path, variant: str | None, vit, vae) -> Path:
    """The model folder to quantize, said out loud: a download folder holds two models."""
    from lance_deploy.checkpoint.layout import discover, is_download_folder

    layout = discover(ckpt, vit=vit, vae=vae, variant=variant)
    if not (Path(ckpt).is_dir() and is_download_folder(Path(ckpt))):
        return ckpt
    other = "image" if layout.variant == "video" else "video"
    why = "--variant" if variant else f"the default; --variant {other} picks the other one"
    click.echo(f"note: quantizing {layout.model_dir} (the {layout.variant} model: {why})", err=True)
    return layout.model_dir


def _check_rules(ckpt, name: str, recipe, vit, vae, allow: bool) -> None:
    """A rule that matches no tensor is a typo or the wrong model: refused unless --allow-unmatched."""
    from lance_deploy.core.errors import LanceUsageError
    from lance_deploy.quant.plan import plan_checkpoint

    warnings = plan_checkpoint(ckpt, recipe, vit=vit, vae=vae).unmatched_warnings
    if warnings and not allow:
        raise LanceUsageError(f"--recipe {name}: {'; '.join(warnings)} of {ckpt}; fix its match (see `lance-deploy "
                              "plan`) or pass --allow-unmatched")
    for w in warnings:
        click.echo(f"warning: --recipe {name}: {w}", err=True)


def _apply_budget(ckpt, recipe, budget, out_dir: Path, vit, vae, device, as_json: bool):
    """Resolve the budget into per-group rules; write the recipe and report beside OUT."""
    import json

    from lance_deploy.core.units import parse_size
    from lance_deploy.quant.budget import format_report, resolve_budget

    if budget is not None:
        parse_size(budget, "--budget")  # a one-line usage error before anything is loaded
    res = resolve_budget(ckpt, recipe, budget, device=device, vit=vit, vae=vae, progress=True)
    out_dir = Path(out_dir)
    out_dir.with_name(out_dir.name + ".budget.yaml").write_text(res.recipe.to_yaml(), encoding="utf-8")
    out_dir.with_name(out_dir.name + ".budget.json").write_text(json.dumps(res.to_dict(), indent=2), encoding="utf-8")
    if not as_json:
        click.echo(format_report(res))
    return res.recipe, res.programs


@click.command("eval", epilog="""\b
Examples:
  lance-deploy eval --reference ckpt/Lance_3B --model exported/lance-fp8 --out exported/lance-fp8/report
""")
@click.option("--reference", type=click.Path(path_type=Path), required=True, help="Full-precision checkpoint.")
@click.option("--model", "model", type=click.Path(path_type=Path), required=True, help="Quantized artifact.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Report folder (default: MODEL/report).")
@click.option("--tasks", default="t2i,x2t_image", show_default=True, help="Comma-separated tasks.")
@click.option("--samples", type=int, default=4, show_default=True, help="Held-out prompts per task.")
@click.option("--steps", type=int, default=30, show_default=True, help="Denoising steps of each generation.")
@click.option("--size", type=int, default=64, show_default=True, help="Generation height = width.")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N or cpu (auto: cuda if present).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result (progress: JSON lines on stderr).")
@click.option("--quiet", is_flag=True, help="No progress bars on stderr.")
def eval_cmd(reference, model, out_dir, tasks, samples, steps, size, device, as_json, quiet):
    """Compare a quantized artifact with its reference on held-out prompts (markdown + JSON report)."""
    from lance_deploy.core import progress
    from lance_deploy.quant.report import run_eval

    with progress.use(progress.mode_for(quiet, as_json)):
        report = run_eval(reference, model, out_dir or Path(model) / "report", tasks=tuple(tasks.split(",")),
                          samples=samples, steps=steps, size=size, device=device, progress=True)
    if as_json:
        echo_json(report)
    else:
        click.echo(f"wrote {report['markdown']}")
