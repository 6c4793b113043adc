"""`lance-deploy run image_edit|video_edit --continue SESSION_DIR [--parent N]`: one turn of a
multi-turn edit session (api_session.EditSession).

A new or empty folder starts a session from --image / --video; an existing one edits its last
turn's output (or turn N's with --parent) and appends the result. Every refusal comes before the
weights load; the session is created only once the first turn has succeeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click

from lance_deploy.api_session import EDIT_TASKS, EditSession, edit_request
from lance_deploy.cli.common import echo_json
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.lock import PathLock

# run options an edit turn has no use for: its size and length come from its input, and a replay
# needs every input on disk (an --init-noise file is not kept)
UNUSED = {"height": "--height", "width": "--width", "frames": "--frames", "question": "--question",
          "system": "--system", "init_noise": "--init-noise"}


@dataclass
class TurnPlan:
    """What one `--continue` run will do, decided before anything loads."""

    folder: Path
    session: EditSession | None  # None: a new session, created from `source` after the turn ran
    parent: int | None
    source: dict  # EditSession.create keywords for a new session
    req: object  # pipeline.tasks.TaskRequest


def check_continue(task: str, session_dir, parent, *, out, save_latents, batch: bool) -> None:
    """The refusals that need no file read: a usage error (exit 2) for each."""
    if session_dir is None:
        raise LanceUsageError("--parent N needs --continue SESSION_DIR (the session whose turn N to edit)")
    if task not in EDIT_TASKS:
        raise LanceUsageError(f"--continue: {task} makes no edit session; use image_edit or video_edit")
    for option, value in (("--out", out), ("--save-latents", save_latents)):
        if value is not None:
            raise LanceUsageError(f"{option}: --continue writes each turn into {session_dir}; drop {option}")
    if batch:
        raise LanceUsageError("--continue runs one turn; drop --prompt-file / --seeds / --num-images")
    if parent is not None and parent < 0:
        raise LanceUsageError(f"--parent {parent}: expected a turn number (0 is the source)")


def prepare(task: str, session_dir: Path, parent: int | None, opts: dict) -> TurnPlan:
    """Open (or plan) the session and build the turn's request, all checked."""
    for key, option in UNUSED.items():
        if opts.get(key) is not None:
            raise LanceUsageError(f"{option}: not an option of an edit turn (it edits its input as it is)")
    sampler = {"seed": opts["seed"], "steps": opts["steps"], "shift": opts["shift"], "cfg": opts["cfg"],
               "preset": opts.get("resolution", opts.get("preset")), "vae_area_side": opts.get("vae_area_side"),
               "vit_area_side": opts.get("vit_area_side")}
    edit_request(task, opts.get("prompt"), **sampler).validate(media=False)  # numbers first, no file read yet
    folder = Path(session_dir)
    media = "--image" if task == "image_edit" else "--video"
    given = opts.get("image") if task == "image_edit" else opts.get("video")
    if folder.exists() and not folder.is_dir():
        raise LanceUsageError(f"--continue {folder}: not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        session = EditSession.open(folder)
        if session.task != task:
            raise LanceUsageError(f"--continue {folder}: holds {session.task} turns; run `lance-deploy run "
                                  f"{session.task} --continue {folder}`")
        for option in ("--image", "--video"):
            if opts.get(option[2:]):
                raise LanceUsageError(f"{option}: {folder} already has its source; a turn edits an earlier "
                                      "turn's output (choose it with --parent N)")
        if parent is not None and parent >= len(session.turns):
            raise LanceUsageError(f"--parent {parent}: {folder} has turns 0..{len(session.turns) - 1}")
        parent = session.turn(parent).index  # pinned now: the turn edits the output checked here
        req = session.request(opts.get("prompt"), parent=parent, **sampler)
        return TurnPlan(folder, session, parent, {}, req.validate())
    if given is None:
        what = "FILE" if task == "image_edit" else "PATH"
        raise LanceUsageError(f"--continue {folder}: a new session; give {media} {what} as its source (turn 0)")
    if parent not in (None, 0):
        raise LanceUsageError(f"--parent {parent}: a new session has only turn 0 (its source)")
    source = _read_source(task, given, opts.get("fps"))
    req = edit_request(task, opts.get("prompt"), **source, **sampler).validate()
    return TurnPlan(folder, None, 0, source, req)


def _read_source(task: str, path, fps) -> dict:
    from lance_deploy.media.io import read_image, read_video

    if task == "image_edit":
        return {"image": read_image(path)}
    frames, rate = read_video(path, fps)
    return {"video": frames, "fps": rate}


def record(turn: TurnPlan, result):
    """Create the session (first turn) and append the result; -> the session and its new Turn."""
    session = turn.session or EditSession.create(turn.folder, **turn.source)
    output = result.frames if session.is_video else result.frames[0]
    return session, session.record(turn.req, output, parent=turn.parent)


def summary(session: EditSession, t, result, wall_s: float) -> dict:
    out = {"task": session.task, "session": str(session.folder), "turn": t.index, "parent": t.parent,
           "prompt": t.prompt, "seed": t.seed, "output": str(session.view_path(t.index)),
           "lossless": str(session.path(t.index)), "turns": len(session.turns), "notes": list(result.notes),
           "timings": {**{k: round(v, 4) for k, v in result.timings.items()}, "wall_s": round(wall_s, 3)}}
    if t.fps is not None:
        out["fps"] = t.fps
    return out


def run_session(task, opts: dict, *, session_dir, parent, model_path, vit, vae, backend, graphs, gpu_memory, markers,
                quiet, as_json, out=None, save_latents=None, batch=False, preset=None) -> None:
    """One turn: check everything, load, run, record, report."""
    import torch

    from lance_deploy.cli.run_engine import check_backend, make_engine, oom_error
    from lance_deploy.core.units import parse_size
    from lance_deploy.pipeline.pipeline import (
        LancePipeline,
        resolve_device,
        resolve_dtype,
    )
    from lance_deploy.planning.request import default_budget, plan_residency

    start = time.perf_counter()
    check_continue(task, session_dir, parent, out=out, save_latents=save_latents, batch=batch)
    with PathLock(session_dir, "--continue"):  # one writer per session: a second run is refused at once
        check_backend(task, backend)
        turn = prepare(task, session_dir, parent, opts)
        budget = parse_size(gpu_memory) if gpu_memory is not None else None
        device = resolve_device(opts["device"])
        dt = resolve_dtype(opts["dtype"], device)
        engine = make_engine(task, backend, graphs, model_path, vit, vae, quiet)
        plan = None
        if budget is not None or device.type == "cuda":  # as `run`: on CUDA, free memory - 1 GiB
            budget = budget if budget is not None else default_budget()
            plan = plan_residency(model_path, turn.req, budget, dt, vit=vit, vae=vae, markers=markers)
        pipe = None
        try:
            pipe = LancePipeline.from_path(model_path, task, vit=vit, vae=vae, device=opts["device"],
                                           dtype=opts["dtype"], backend=engine, memory_plan=plan,
                                           compile=opts.get("compile", False))
            result = pipe(turn.req, progress=True)  # the progress mode (bars, --json events, --quiet) decides
        except torch.cuda.OutOfMemoryError as e:
            raise oom_error(pipe.phase if pipe is not None else "load", gpu_memory, e) from None
        session, t = record(turn, result)
        report = summary(session, t, result, time.perf_counter() - start)
    if preset is not None:
        report["preset"] = preset
    if as_json:
        echo_json(report)
        return
    for note in report["notes"]:
        click.echo(f"note: {note}", err=True)
    extra = f" (lossless frames: {Path(report['lossless']).name}, {t.fps:g} fps)" if session.is_video else ""
    click.echo(f"turn {t.index} (edits turn {t.parent}): wrote {report['output']}{extra}")
    click.echo(f"wall time {report['timings']['wall_s']:.2f} s", err=True)
