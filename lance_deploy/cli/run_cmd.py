"""`lance-deploy run TASK`: run one of the seven tasks from a release checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from lance_deploy.cli.common import echo_json
from lance_deploy.cli.plan_memory import MARKERS_OPTION
from lance_deploy.cli.presets import PRESET_OPTION, apply_preset
from lance_deploy.cli.run_batch import BATCH_OPTIONS, run_batch, wants_batch
from lance_deploy.cli.run_engine import check_backend, make_engine, oom_error
from lance_deploy.core import progress
from lance_deploy.core.fsutil import check_output_path
from lance_deploy.core.tasks import TASKS, VIDEO_OUTPUT_TASKS
from lance_deploy.core.units import parse_size

TASK_CHOICES = TASKS


@click.command("run", epilog="""\b
Examples:
  lance-deploy run t2i --model ckpt/Lance_3B --prompt "A red boat at sunset" --out boat.png
  lance-deploy run t2v --model ckpt --prompt "Waves at dusk" --frames 49 --out waves.mp4
  lance-deploy run image_edit --model ckpt/Lance_3B --image in.png --prompt "Add snow"
  lance-deploy run t2i --model ckpt/Lance_3B --prompt "A red boat" --negative-prompt "blurry" --out outs/
  lance-deploy run x2t_image --model ckpt/Lance_3B --image cat.png --question "What animal is this?" --json
  lance-deploy run t2v --model ckpt --prompt "Waves at dusk" --frames 121 --gpu-memory 12GiB --markers stream
  lance-deploy run t2i --model exported/lance-fp8 --prompt "A red boat" --compile    # torch.compile each layer
  lance-deploy run t2i --model ckpt/Lance_3B --prompt-file prompts.jsonl --out outs/     # reruns skip what exists
  lance-deploy run t2i --model ckpt/Lance_3B --prompt "A red boat" --seeds 1,2,3 --out sweep/
  lance-deploy run t2v --model ckpt --prompt "Waves at dusk" --preset rtx4090
  lance-deploy run image_edit --model ckpt/Lance_3B --continue sessions/boat --image boat.png --prompt "Add snow"
  lance-deploy run image_edit --model ckpt/Lance_3B --continue sessions/boat --parent 1 --prompt "Make it night"
  lance-deploy run video_edit --model ckpt --continue sessions/waves --video waves.mp4 --prompt "Make it snow"
""")
@click.argument("task", type=click.Choice(TASK_CHOICES))
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Download folder or a model folder (Lance_3B / Lance_3B_Video).")
@click.option("--vit", type=click.Path(path_type=Path), help="Qwen2.5-VL-ViT folder (default: beside the model).")
@click.option("--vae", type=click.Path(path_type=Path), help="Wan2.2_VAE.pth (default: beside the model).")
@click.option("--prompt", help="Caption (t2i/t2v/i2v) or edit instruction.")
@click.option("--negative-prompt", help="What to steer away from: text CFG's unconditional branch runs with this "
              "caption instead of none (default: none, as upstream).")
@click.option("--question", help="Question for x2t_image / x2t_video.")
@click.option("--system", help="System prompt for understanding (default: upstream's).")
@click.option("--image", type=click.Path(path_type=Path), help="Input image (i2v, image_edit, x2t_image).")
@click.option("--video", type=click.Path(path_type=Path), help="Input video file or folder of numbered frames.")
@click.option("--fps", type=float, help="Frame rate of a --video frame folder.")
@click.option("--height", type=int, help="Output height, a multiple of 16 (t2i 768, t2v 480).")
@click.option("--width", type=int, help="Output width, a multiple of 16 (t2i 768, t2v 848).")
@click.option("--frames", type=int, help="Output frames, 4k+1 up to 121 (t2v 121, i2v 61).")
@click.option("--steps", type=int, default=30, show_default=True, help="Denoising steps.")
@click.option("--shift", type=float, default=3.5, show_default=True, help="Timestep shift.")
@click.option("--cfg", type=float, default=4.0, show_default=True, help="Text CFG scale (1 disables CFG).")
@click.option("--seed", type=int, default=42, show_default=True, help="Noise seed.")
@click.option("--resolution", "resolution", help="Input preset: image_256res, image_512res, image_768res, "
              "video_192p, video_360p, video_480p.")
@click.option("--vae-area-side", type=int, help="Override the preset's VAE bucket side.")
@click.option("--vit-area-side", type=int, help="Override the preset's ViT bucket side.")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N or cpu.")
@click.option("--dtype", default="auto", show_default=True,
              help="float32 (parity-grade), bfloat16 or float16; auto = bf16 on GPU, fp32 on CPU.")
@click.option("--out", type=click.Path(), help="Output PNG/MP4 (generation) or text file (x2t), or a "
              "folder for a default name lance-TASK-sSEED-YYYYmmdd-HHMMSS[-N].EXT (never overwritten).")
@click.option("--init-noise", type=click.Path(path_type=Path), help="Safetensors file with tensor 'noise' [N, 48].")
@click.option("--save-latents", type=click.Path(path_type=Path), help="Write final_latent_<i> per VAE block here.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="x2t decode budget.")
@click.option("--backend", type=click.Choice(("torch", "onnxruntime", "tensorrt")), default="torch", show_default=True,
              help="Where the denoising query and the VAE decode run (generation tasks); prefill stays in torch.")
@click.option("--graphs", type=click.Path(path_type=Path),
              help="Export folder for --backend onnxruntime/tensorrt (onnxruntime default: export into a cache).")
@click.option("--gpu-memory", help="Device budget, e.g. 12GiB: plan residency and stream expert layers when "
              "the weights do not fit (default on CUDA: free memory minus 1 GiB; on CPU: no budget).")
@MARKERS_OPTION
@click.option("--compile", "compile", is_flag=True, help="torch.compile each backbone layer (inductor, no CUDA graphs; "
              "works with --gpu-memory streaming). The first request pays the compile time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--continue", "session_dir", type=click.Path(path_type=Path),
              help="Edit session folder (image_edit, video_edit): edit its last turn's output and append the "
              "result; a new folder starts a session from --image / --video.")
@click.option("--parent", type=int, help="With --continue: the turn to edit instead (0 = the source).")
@BATCH_OPTIONS
@PRESET_OPTION
@click.pass_context
def run_command(ctx, task, model_path, vit, vae, as_json, quiet, out, save_latents, backend, graphs, gpu_memory, markers,
                prompt_file, seeds, num_images, gpu_preset, **opts):
    """Run TASK (t2i, t2v, i2v, image_edit, video_edit, x2t_image, x2t_video)."""
    with progress.use(progress.mode_for(quiet, as_json)):
        gpu_memory, markers, chosen = apply_preset(ctx, gpu_preset, model_path, gpu_memory, markers, as_json)
        session_dir, parent = opts.pop("session_dir"), opts.pop("parent")
        if session_dir is not None or parent is not None:  # one turn of an edit session: cli/run_session.py
            from lance_deploy.cli.run_session import run_session

            return run_session(task, opts, session_dir=session_dir, parent=parent, model_path=model_path, vit=vit,
                               vae=vae, backend=backend, graphs=graphs, gpu_memory=gpu_memory, markers=markers,
                               quiet=quiet, as_json=as_json, out=out, save_latents=save_latents,
                               batch=wants_batch(prompt_file, seeds, num_images), preset=chosen)
        if wants_batch(prompt_file, seeds, num_images):
            return run_batch(ctx, task, opts, prompt_file=prompt_file, seeds=seeds, num_images=num_images,
                             model_path=model_path, vit=vit, vae=vae, out=out, save_latents=save_latents,
                             backend=backend, graphs=graphs, gpu_memory=gpu_memory, markers=markers, quiet=quiet,
                             as_json=as_json, preset=chosen)
        return _run_one(task, model_path, vit, vae, as_json, quiet, out, save_latents, backend, graphs, gpu_memory,
                        markers, chosen, opts)


def _run_one(task, model_path, vit, vae, as_json, quiet, out, save_latents, backend, graphs, gpu_memory, markers,
             chosen, opts):
    from lance_deploy.cli.out_names import resolve_out
    from lance_deploy.cli.run_request import build_request, write_outputs
    from lance_deploy.pipeline.pipeline import (
        LancePipeline,
        resolve_device,
        resolve_dtype,
    )
    from lance_deploy.planning.request import default_budget, plan_residency

    start = time.perf_counter()
    # Everything that can be refused is refused here, before a byte of weights is read.
    target = resolve_out(task, out, opts["seed"], opts.get("frames"))  # a folder or nothing: a default name
    check_backend(task, backend)
    _check_out(task, target.path, opts.get("frames"))
    if save_latents is not None:
        check_output_path(save_latents, "--save-latents")
    req = build_request(task, opts)
    budget = parse_size(gpu_memory) if gpu_memory is not None else None
    device = resolve_device(opts["device"])
    dt = resolve_dtype(opts["dtype"], device)
    engine = make_engine(task, backend, graphs, model_path, vit, vae, quiet)
    plan = None
    if budget is not None or device.type == "cuda":  # on CUDA the default budget is free memory - 1 GiB
        budget = budget if budget is not None else default_budget()
        plan = plan_residency(model_path, req, budget, dt, vit=vit, vae=vae, markers=markers)
    pipe = None
    try:
        with progress.loading():
            pipe = LancePipeline.from_path(model_path, task, vit=vit, vae=vae, device=opts["device"],
                                           dtype=opts["dtype"], backend=engine, memory_plan=plan,
                                           compile=opts["compile"])
        result = pipe(req, progress=True)  # the progress mode (bars, --json events, --quiet) decides
    except torch.cuda.OutOfMemoryError as e:
        raise oom_error(pipe.phase if pipe is not None else "load", gpu_memory, e) from None
    summary = write_outputs(task, result, target, save_latents)
    summary["timings"]["wall_s"] = round(time.perf_counter() - start, 3)
    if chosen is not None:
        summary["preset"] = chosen
    if as_json:
        echo_json(summary)
        return
    for note in summary["notes"]:
        click.echo(f"note: {note}", err=True)
    if "text" in summary:
        click.echo(summary["text"])
    else:
        click.echo(f"wrote {summary['output']}")
    click.echo(f"wall time {summary['timings']['wall_s']:.2f} s", err=True)


def _check_out(task: str, out, frames) -> None:
    """Refuse an output name that cannot hold the result before any work is done."""
    from lance_deploy.core.errors import LanceUsageError

    if out is None:
        return
    video = task in VIDEO_OUTPUT_TASKS and frames != 1
    if video and out.suffix.lower() != ".mp4":
        raise LanceUsageError(f"--out {out}: {task} writes a video; give a .mp4 path")
    if task.startswith("x2t") and out.suffix.lower() in (".png", ".mp4"):
        raise LanceUsageError(f"--out {out}: {task} writes text; give a .txt path")
    check_output_path(out, "--out")
