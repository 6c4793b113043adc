"""`run TASK --prompt-file FILE` / `--seeds` / `--num-images`: many outputs from one model load.

Every line is validated (options, media, memory plan) before any weights are read; a bad line is
reported by its line number and the others still run. Outputs are written as each finishes, under
names that do not depend on time (`pipeline.batch.expand`), so a rerun skips what exists. The exit
status is non-zero when any item failed: 2 when a line was refused up front, else 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from lance_deploy.cli.common import echo_json
from lance_deploy.core import progress
from lance_deploy.core.errors import LanceError, LanceUsageError
from lance_deploy.core.tasks import UNDERSTANDING_TASKS
from lance_deploy.pipeline.batch import (
    BatchItem,
    BatchLine,
    expand,
    mark_done,
    read_prompt_file,
    sweep,
)

SINGLE_FILE_SUFFIXES = (".png", ".mp4", ".txt")


def BATCH_OPTIONS(f):
    """`run`'s batch options (any of them makes the run a batch)."""
    for option in reversed((
        click.option("--prompt-file", type=click.Path(path_type=Path),
                     help="Many prompts, one model load: one per line, JSONL with per-line overrides (prompt, seed, "
                          "height, width, frames, negative_prompt, image, video, out, ...), or upstream's JSON of "
                          "name -> prompt. --out is then a folder; existing outputs are skipped (resume)."),
        click.option("--seeds", help="Seed sweep: comma-separated seeds, one output per prompt and seed (1,2,3)."),
        click.option("--num-images", type=int, help="Seed sweep: N outputs per prompt, seeds --seed .. --seed+N-1."),
    )):
        f = option(f)
    return f


def wants_batch(prompt_file, seeds, num_images) -> bool:
    return prompt_file is not None or seeds is not None or num_images is not None


def run_batch(ctx: click.Context, task: str, opts: dict, *, prompt_file, seeds, num_images, model_path, vit, vae,
              out, save_latents, backend, graphs, gpu_memory, markers, quiet, as_json, preset=None) -> None:
    from lance_deploy.cli.run_engine import check_backend, make_engine, oom_error
    from lance_deploy.core.units import parse_size
    from lance_deploy.pipeline.pipeline import (
        LancePipeline,
        resolve_device,
        resolve_dtype,
    )

    start = time.perf_counter()
    check_backend(task, backend)
    _refuse_single_file_options(save_latents, opts, out)
    budget = parse_size(gpu_memory) if gpu_memory is not None else None
    out_dir = Path(out) if out is not None else Path(".")
    if task in UNDERSTANDING_TASKS and (seeds is not None or num_images is not None):
        raise LanceUsageError(f"--seeds / --num-images: {task} decodes greedily, so every seed gives the same "
                              "answer; use --prompt-file for many questions")
    lines = read_prompt_file(prompt_file, task) if prompt_file is not None else [BatchLine(1)]
    items = expand(task, lines, sweep(opts["seed"], seeds, num_images), out_dir, opts.get("frames"))
    where = f"--prompt-file {prompt_file}" if prompt_file is not None else "--prompt"
    skipped = mark_done(items)
    device = resolve_device(opts["device"])
    dt = resolve_dtype(opts["dtype"], device)
    todo = _validate(task, opts, items)
    plan, todo = _plan(task, opts, model_path, todo, budget, device, dt, vit, vae, markers)
    for it in items:
        if it.error is not None:
            it.status = "invalid"  # refused before the model loads: a bad line, file or plan
            _report(as_json, it, f"{where} line {it.line}: {it.error}")
    if skipped:
        _note(as_json, f"{skipped} output(s) already in {out_dir} (resume: skipped)")
    if todo:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LanceUsageError(f"--out {out_dir}: cannot create the folder ({e.strerror})") from None
        engine = make_engine(task, backend, graphs, model_path, vit, vae, quiet)
        with progress.loading():
            pipe = LancePipeline.from_path(model_path, task, vit=vit, vae=vae, device=opts["device"],
                                           dtype=opts["dtype"], backend=engine, memory_plan=plan,
                                           compile=opts.get("compile", False))
        _run_items(task, opts, todo, pipe, gpu_memory, as_json, where, oom_error)
    counts = {s: sum(it.status == s for it in items) for s in ("ok", "skipped", "invalid", "failed")}
    summary = {"task": task, "out": str(out_dir), "items": [it.to_dict() for it in items], "counts": counts,
               "wall_s": round(time.perf_counter() - start, 3)}
    if preset is not None:
        summary["preset"] = preset
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"batch: {counts['ok']} written, {counts['skipped']} skipped, {counts['invalid']} invalid, "
                   f"{counts['failed']} failed in {summary['wall_s']:.1f} s", err=True)
    if counts["invalid"] or counts["failed"]:
        ctx.exit(2 if counts["invalid"] else 1)


def _refuse_single_file_options(save_latents, opts: dict, out) -> None:
    if save_latents is not None:
        raise LanceUsageError("--save-latents names one file; run items one at a time to keep their latents")
    if opts.get("init_noise") is not None:
        raise LanceUsageError("--init-noise fixes the noise, so every seed of a batch would give the same output; "
                              "drop it or run without --prompt-file/--seeds/--num-images")
    if out is not None and not Path(out).is_dir() and (Path(out).suffix.lower() in SINGLE_FILE_SUFFIXES
                                                      or Path(out).exists()):
        raise LanceUsageError(f"--out {out}: a batch writes one file per item; give a folder")


def _validate(task: str, opts: dict, items: list[BatchItem]) -> list[tuple[BatchItem, object]]:
    """Build every pending item's request (reading its media) before the model loads. Requests
    with media are rebuilt when their turn comes, so a long batch never holds every video."""
    from lance_deploy.cli.run_request import build_request
    from lance_deploy.pipeline.tasks import SPECS

    todo = []
    for it in items:
        if it.status != "pending" or it.error is not None:
            continue
        try:
            req = build_request(task, {**opts, **it.fields})
        except LanceError as e:
            it.error, it.status = str(e), "invalid"
            continue
        if SPECS[task].media:
            req.image = req.video = None  # planning needs only the sizes; the run reads the file again
        todo.append((it, req))
    return todo


def _plan(task, opts, model_path, todo, budget, device, dt, vit, vae, markers):
    """One residency plan for the whole batch: the one with the largest predicted peak (smaller
    items fit under it). Items that fit under no plan are refused here, by line. Returns the plan
    (None when no budget applies) and the items still to run."""
    from lance_deploy.planning.request import default_budget, plan_residency

    if not todo or (budget is None and device.type != "cuda"):
        return None, todo
    budget = budget if budget is not None else default_budget()
    best, seen, kept = None, {}, []
    for it, req in todo:
        s = req.sampler
        key = (req.height, req.width, req.frames, s.steps, s.cfg_scale, req.preset, req.max_new_tokens)
        try:
            if key not in seen:
                seen[key] = plan_residency(model_path, req, budget, dt, vit=vit, vae=vae, markers=markers)
        except LanceUsageError as e:
            it.error, it.status = str(e), "invalid"
            continue
        kept.append((it, req))
        if best is None or seen[key].plan.peak.total > best.plan.peak.total:
            best = seen[key]
    return best, kept


def _run_items(task, opts, todo, pipe, gpu_memory, as_json, where, oom_error) -> None:
    from lance_deploy.cli.run_request import build_request, write_outputs
    from lance_deploy.pipeline.tasks import SPECS

    with progress.bar(len(todo), f"{task} batch", unit="item") as bar:
        for it, req in todo:
            try:
                if SPECS[task].media:
                    req = build_request(task, {**opts, **it.fields})
                result = pipe(req, progress=True)
                summary = write_outputs(task, result, it.out, None)
            except torch.cuda.OutOfMemoryError as e:
                it.error = str(oom_error(pipe.phase, gpu_memory, e))
            except LanceError as e:
                it.error = str(e)
            if it.error is not None:
                it.status = "failed"
                _report(as_json, it, f"{where} line {it.line}: {it.error}")
            else:
                it.status = "ok"
                for note in summary["notes"]:
                    _note(as_json, f"line {it.line}: {note}")
                if as_json:
                    progress.emit("item", **it.to_dict())
                else:
                    click.echo(f"wrote {it.out}")
            if bar is not None:
                bar.update(1)


def _report(as_json: bool, it: BatchItem, message: str) -> None:
    if as_json:
        progress.emit("item", **it.to_dict())
    else:
        click.echo(f"Error: {message}", err=True)


def _note(as_json: bool, message: str) -> None:
    if as_json:
        progress.emit("note", message=message)
    else:
        click.echo(f"note: {message}", err=True)
