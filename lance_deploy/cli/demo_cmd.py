"""`lance-deploy demo`: the whole pipeline on a tiny checkpoint the project generates."""

from __future__ import annotations

import time
from pathlib import Path

import click

from lance_deploy.cli.common import echo_json


def _run_demo(out: Path, steps: int, progress: bool) -> dict:
    from lance_deploy.checkpoint.make import make_checkpoint
    from lance_deploy.media.io import write_image
    from lance_deploy.pipeline.pipeline import LancePipeline
    from lance_deploy.pipeline.sampler import SamplerConfig
    from lance_deploy.pipeline.tasks import TaskRequest

    ckpt = out / "tiny-checkpoint"
    if not (ckpt / "Lance_3B" / "model.safetensors").exists():
        make_checkpoint(ckpt, size="tiny", progress=progress, force=True)
    sampler = SamplerConfig(steps=steps)
    results = {"checkpoint": str(ckpt)}

    t2i = LancePipeline.from_path(ckpt, "t2i", device="cpu", dtype="float32")
    image = t2i(TaskRequest(task="t2i", prompt="A small red boat on a blue river at sunset.", height=64, width=64,
                            sampler=sampler), progress=progress)
    write_image(image.frames[0], out / "t2i.png")
    results["t2i"] = {"output": str(out / "t2i.png"), "timings": image.timings}

    x2t = LancePipeline.from_path(ckpt, "x2t_image", device="cpu", dtype="float32")
    answer = x2t(TaskRequest(task="x2t_image", image=image.frames[0], question="What is in the picture?",
                             preset="image_256res", max_new_tokens=16), progress=progress)
    results["x2t_image"] = {"text": answer.text, "token_ids": answer.token_ids, "timings": answer.timings}
    results.update(_quantized_demo(ckpt / "Lance_3B", out, sampler, progress))
    return results


def _quantized_demo(model: Path, out: Path, sampler, progress: bool) -> dict:
    """quantize (calibrated int8 recipe, small calibration) -> run from the artifact -> eval."""
    import dataclasses

    from lance_deploy.media.io import write_image
    from lance_deploy.pipeline.pipeline import LancePipeline
    from lance_deploy.pipeline.tasks import TaskRequest
    from lance_deploy.quant.quantize import quantize
    from lance_deploy.quant.recipe import load_recipe
    from lance_deploy.quant.report import run_eval

    recipe = load_recipe("int8-ampere")
    # a demo-sized calibration (the shipped recipe calibrates on 16 samples per task at 256 px)
    recipe = recipe.replace(calibration=dataclasses.replace(recipe.calibration, samples_per_task=2, steps=10,
                                                            timesteps="all", height=64, width=64))
    artifact = out / "int8-ampere"
    q = quantize(model, recipe, artifact, restart=True, overwrite=True, progress=progress)
    pipe = LancePipeline.from_path(artifact, "t2i", device="cpu", dtype="float32")
    image = pipe(TaskRequest(task="t2i", prompt="A small red boat on a blue river at sunset.", height=64, width=64,
                             sampler=sampler), progress=progress)
    write_image(image.frames[0], out / "t2i-int8.png")
    report = run_eval(model, artifact, out / "int8-ampere-report", tasks=("t2i", "x2t_image"), samples=2,
                      steps=sampler.steps, size=64, device="cpu", progress=progress)
    return {"quantize": {"artifact": str(artifact), "seconds": round(q.seconds, 2),
                         "bytes": q.plan.total_bytes, "bf16_bytes": q.plan.bf16_bytes},
            "t2i_int8": {"output": str(out / "t2i-int8.png")},
            "eval": {"report": report["markdown"],
                     "t2i_final_latent_snr_db": report["tasks"]["t2i"]["final_latent_snr_db"]}}


@click.command("demo", epilog="""\b
Examples:
  lance-deploy demo
  lance-deploy demo --out exported/demo --steps 10 --json
""")
@click.option("--out", type=click.Path(path_type=Path), default=Path("exported/demo"), show_default=True,
              help="Folder for the tiny checkpoint and the outputs.")
@click.option("--steps", type=int, default=30, show_default=True, help="Denoising steps for t2i.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def demo_cmd(out: Path, steps: int, as_json: bool) -> None:
    """Tiny random checkpoint in the release layout -> t2i and x2t_image -> quantize -> run -> eval.

    The weights are random, so the image is noise-like and the answer is gibberish: the demo
    shows that every stage runs end to end on a fresh machine, CPU only.
    """
    start = time.perf_counter()
    results = _run_demo(out, steps, progress=not as_json)
    results["wall_s"] = round(time.perf_counter() - start, 3)
    if as_json:
        echo_json(results)
        return
    click.echo(f"checkpoint  {results['checkpoint']}")
    click.echo(f"t2i         wrote {results['t2i']['output']} ({results['t2i']['timings']['denoise_s']:.2f} s denoise)")
    click.echo(f"x2t_image   {results['x2t_image']['text']!r} (ids {results['x2t_image']['token_ids']})")
    click.echo(f"quantize    {results['quantize']['artifact']} (int8-ampere, {results['quantize']['seconds']} s)")
    click.echo(f"t2i (int8)  wrote {results['t2i_int8']['output']}")
    click.echo(f"eval        {results['eval']['report']} "
               f"(t2i final-latent SNR {results['eval']['t2i_final_latent_snr_db']:.1f} dB vs fp32)")
    click.echo(f"wall time   {results['wall_s']:.2f} s")
