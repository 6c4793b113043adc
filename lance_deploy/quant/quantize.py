"""`quantize`: release checkpoint + recipe -> a sealed, resumable quantized artifact.

The source is streamed: shared tensors (embeddings, heads, bridges, ViT, VAE) tensor by tensor,
the decoder one layer at a time (only that layer's fp32 weights are live, plus the calibration
programs' hidden states). The artifact is assembled in `<out>.partial/` and renamed when sealed.
Each finished layer is written once, into its shards there, made durable, and then recorded in
the job folder (under a fingerprint of source, recipe and calibration) with the sha256 of each of
its tensors, the calibration hidden states after it and its W8A8 input amax values. An
interrupted run keeps the partial folder, takes the recorded layers back from it (each checked
against its hash) and goes on from the next one, so it produces the same bytes; if the partial
folder is gone, the layers are quantized again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lance_deploy import __version__
from lance_deploy.artifact.writer import ArtifactWriter
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.buffers import BufferPool
from lance_deploy.checkpoint.layout import discover
from lance_deploy.checkpoint.loader import load_layer, load_vae_state_dict
from lance_deploy.checkpoint.pages import drop_file_pages
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.checkpoint.vae_keys import check_vae_file
from lance_deploy.core.faults import fault_point
from lance_deploy.core.host_memory import fix_mmap_threshold
from lance_deploy.core.lock import PathLock
from lance_deploy.core.overlap import WriteBehind, read_ahead
from lance_deploy.core.progress import bar as progress_bar
from lance_deploy.formats.base import host_buffers
from lance_deploy.model.mot import MoTLayer
from lance_deploy.quant.apply import LinearJob, linear_jobs
from lance_deploy.quant.jobs import JobFingerprint, JobState, source_fingerprint
from lance_deploy.quant.layerwise import quantize_one_layer
from lance_deploy.quant.plan import QuantPlan, resolve_plan
from lance_deploy.quant.recipe import Recipe


@dataclass
class QuantizeResult:
    out_dir: Path
    plan: QuantPlan
    seconds: float
    resumed_layers: int
    calibration: dict
    notes: tuple[str, ...] = ()  # what an interrupted run had left, and what became of it


def _jobs(plan: QuantPlan, layer: int) -> dict[str, LinearJob]:
    return linear_jobs(e for e in plan.entries
                       if e.packed and cn.layer_of(e.name) == layer and cn.is_linear_weight(e.name))


def _shared_source(layout, pool: BufferPool):
    """(the loader of a plan entry not in the decoder layers, as the plan stores it; the model's
    reader)."""
    # one pass over a source larger than RAM: O_DIRECT (no page-cache copy or reclaim), into buffers
    # handed out again once a layer is gone, not fresh pages the kernel must zero (checkpoint/buffers.py)
    lance = SafetensorsReader(layout.weights_file, direct=True, pool=pool)
    vit = lance if layout.has_bundled_vit else (SafetensorsReader(layout.vit_file, direct=True, pool=pool)
                                                if layout.vit_file else None)
    vae = load_vae_state_dict(layout.vae_file) if layout.vae_file else None

    def load(entry) -> torch.Tensor:
        name = entry.name
        if name.startswith("vae."):  # stored straight from the mapped file: no fp32 copy first
            mapped = vae[name[4:]]
            value = _store(entry, mapped)
            same = isinstance(value, torch.Tensor) and value.data_ptr() == mapped.data_ptr()
            if same:
                value = value.clone()  # stored as it is: keep no view of the mapped file
            drop_file_pages(mapped)
            return value
        if name.startswith("vit.") and not layout.has_bundled_vit:
            return _store(entry, vit.read(name[4:]))
        return _store(entry, lance.read(cn.to_release(name)))

    return load, lance


def _store(entry, value: torch.Tensor):
    """A tensor as the plan stores it: packed (RTN for shared 2-D weights) or plain bf16."""
    from lance_deploy.quant.algorithms import rtn

    if entry.packed:
        return rtn(value.float(), None, entry.spec())
    return value.to(torch.bfloat16)


def _layer_tensors(plan: QuantPlan, index: int, layer: MoTLayer, result) -> dict:
    """Every tensor of decoder layer `index` as it goes into the artifact."""
    out = {}
    for e in plan.entries:
        if cn.layer_of(e.name) != index or e.format == "skip":
            continue
        path = cn.module_path(e.name)
        if cn.is_linear_weight(e.name) and path in result.packed:
            out[e.name] = result.packed[path]
            continue
        attr = cn.to_release(e.name).rsplit(".", 1)[1]  # 'weight' or 'bias'
        value = result.norms.get(path) if attr == "weight" else None
        if value is None:
            value = getattr(layer.get_submodule(path), attr).detach()  # a QLinear keeps its bias as a buffer
        out[e.name] = _store(e, value)
    return out


def job_dir(out_dir, work_dir=None) -> Path:
    """The job folder of a run: ``--work``, or ``OUT.job`` beside the artifact."""
    out_dir = Path(out_dir)
    return Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".job")


def _one_writer(fn):
    """Hold the locks of the artifact and of the job folder for the whole run (``core/lock.py``);
    a second run on either is refused, one left by a killed run is taken over."""
    @functools.wraps(fn)
    def run(model_path, recipe, out_dir, *, work_dir=None, **kwargs) -> QuantizeResult:
        out_dir, work_dir = Path(out_dir), job_dir(out_dir, work_dir)
        with PathLock(out_dir, "--out") as out_lock, PathLock(work_dir, "--work") as work_lock:
            res = fn(model_path, recipe, out_dir, work_dir=work_dir, **kwargs)
        res.notes = (*(lock.note for lock in (out_lock, work_lock) if lock.note), *res.notes)
        return res

    return run


@_one_writer
def quantize(model_path, recipe: Recipe, out_dir, *, work_dir=None, vit=None, vae=None, device="cpu",
             restart: bool = False, overwrite: bool = False, progress: bool = True, programs=None,
             budget=None) -> QuantizeResult:
    """Quantize the checkpoint at `model_path` with `recipe` into the artifact folder `out_dir`.

    `budget` ('12GiB' or bytes): first rewrite the recipe's decoder rules into per-group formats
    chosen by measured sensitivity within that many weight bytes (``quant/budget.py``); the
    calibration programs recorded for the measurement are reused.
    """
    start = time.perf_counter()
    fix_mmap_threshold()  # freed layers go back to the OS, so peak RSS stays at the live bytes
    if budget is not None:
        from lance_deploy.quant.budget import resolve_budget

        chosen = resolve_budget(model_path, recipe, budget, device=device, programs=programs, vit=vit, vae=vae,
                                progress=progress)
        recipe, programs = chosen.recipe, chosen.programs
    out_dir = Path(out_dir)
    work_dir = job_dir(out_dir, work_dir)
    layout, (job, source) = _open_job(model_path, recipe, work_dir, vit, vae, device, restart)
    cfg = layout.config()
    plan = resolve_plan(cn.layout_shapes(layout), recipe)
    device = torch.device(device)
    if recipe.needs_calibration and programs is None:
        programs = _calibration_programs(layout, recipe, job, device, progress, plan)
    programs = programs or []
    hidden = [[c.x for c in p.calls] for p in programs]
    pool = BufferPool(idle_bytes=POOL_IDLE_BYTES)  # read buffers and packed codes, recycled
    load_shared, lance = _shared_source(layout, pool)
    # what the manifest will carry: proves a sealed-but-unrenamed OUT.partial is this job's own
    owner = {"source": source.to_dict(), "recipe": recipe.to_dict(), "created": job.created}
    writer = ArtifactWriter(out_dir, overwrite=overwrite, num_layers=cfg.num_hidden_layers, owner=owner,
                            resume=job.run_id)
    writer.declare_plan(plan.entries)
    resumed = 0
    steps = [f"layer-{i:03d}" for i in range(cfg.num_hidden_layers)]
    if not writer.resumed:  # the shards that held the finished layers are gone: quantize them again
        job.forget(steps)
    todo = [i for i in range(cfg.num_hidden_layers) if not job.is_done(steps[i])]
    shared = [e for e in plan.entries if cn.layer_of(e.name) is None and e.format != "skip"]
    # the reader thread loads the next tensors / layers while this thread packs; the write-behind
    # thread saves each finished layer and streams it into the artifact (core/overlap.py)
    loads = [(_fp32_bytes([e]), functools.partial(load_shared, e)) for e in shared]
    loads += [(_fp32_bytes(e for e in plan.entries if cn.layer_of(e.name) == i),
               functools.partial(load_layer, lance, cfg, i, device=device)) for i in todo]
    with (contextlib.closing(read_ahead(loads, READ_AHEAD_BYTES)) as source,
          progress_bar(cfg.num_hidden_layers, "quantize layers", unit="layer", enabled=progress) as bar,
          WriteBehind() as behind):
        for e in shared:  # written here, not behind: two 1.24 GB fp32 tables in flight would pass 3 GB
            writer.add(e.name, next(source))
        for index, step in enumerate(steps):
            if index not in todo:
                kept, meta = job.load_step(step)
                hidden = _restore_hidden(kept, programs, hidden)
                resumed += 1
                behind.submit(functools.partial(_adopt_layer, writer, kept, meta, bar))
                continue
            layer = next(source)
            with host_buffers(pool.take):
                result, hidden = quantize_one_layer(layer, _jobs(plan, index), cfg, programs, hidden, device,
                                                    amax=_amax_choice(recipe))
            tensors = _layer_tensors(plan, index, layer, result)
            kept = _hidden_tensors(hidden) | _amax_tensors(plan, index, result)
            del layer, result
            behind.submit(functools.partial(_save_layer, job, step, writer, tensors, kept, bar))
    summary = _calibration_summary(programs, recipe)
    writer.seal(**owner, calibration=summary, source_dir=layout.model_dir)
    notes = (writer.recovered,) if writer.recovered else ()
    return QuantizeResult(out_dir, plan, time.perf_counter() - start, resumed, summary, notes)


POOL_IDLE_BYTES = 3 << 28
"""Idle read buffers kept for the next layers: one full-size decoder layer's fp32 tensors (0.62 GB)
and change; the 1.24 GB embedding tables' buffers are freed once layers need the room."""

READ_AHEAD_BYTES = 5 << 28
"""fp32 bytes loaded ahead of the packing loop: one full-size decoder layer (0.62 GB) beside the
one being packed, or one embedding table alone (1.24 GB), so peak RSS stays under 3 GB (measured
in docs/benchmarks.md, with `fix_mmap_threshold`)."""


def _fp32_bytes(entries) -> int:
    return sum(4 * math.prod(e.shape) for e in entries)


def _save_layer(job: JobState, step: str, writer: ArtifactWriter, tensors: dict, kept: dict, bar) -> None:
    """Write-behind: the layer's tensors into the artifact's shards, made durable; then its job
    step (hidden states, amax values, each tensor's sha256), and then it counts as done."""
    for name, value in tensors.items():
        writer.add(name, value, activation_amax=_amax_of(kept, name))
    writer.sync()
    hashes = {name: writer.tensor_sha256(name) for name in tensors}
    job.save_step(step, kept, meta={LAYER_HASHES: json.dumps(hashes, sort_keys=True)})
    fault_point("quantize.layer-done")
    if bar is not None:
        bar.update(1)


def _adopt_layer(writer: ArtifactWriter, kept: dict, meta: dict, bar) -> None:
    """Write-behind, resuming: a finished layer's tensors back from the kept shards, hash-checked."""
    for name, sha in json.loads(meta[LAYER_HASHES]).items():
        writer.adopt(name, sha, activation_amax=_amax_of(kept, name))
    if bar is not None:
        bar.update(1)


def _amax_of(kept: dict, name: str) -> float | None:
    amax = kept.get(f"{AMAX_KEY}.{name}")
    return None if amax is None else float(amax)


def _open_job(model_path, recipe: Recipe, work_dir: Path, vit, vae, device, restart: bool):
    """Discover the source and open (or resume) the job folder under the run's fingerprint."""
    layout = discover(model_path, vit=vit, vae=vae)
    if layout.vae_file is not None:  # before any work: a broken VAE would be sealed into the artifact
        check_vae_file(layout.vae_file)
    calib = recipe.calibration.to_dict() if (recipe.calibration and recipe.needs_calibration) else None
    source = source_fingerprint(layout)
    fingerprint = JobFingerprint.of(source.to_dict(), recipe.to_dict(), calib, __version__, layer_steps=LAYER_STEPS)
    job = JobState(work_dir)
    job.start(fingerprint, {"device": str(device)}, restart=restart)
    return layout, (job, source)


def calibrate(model_path, recipe: Recipe, work_dir, *, device="cpu", restart=False, progress=True) -> dict:
    """Record the calibration programs into `work_dir`; a later `quantize(..., work_dir=...)` reuses them."""
    layout, (job, _) = _open_job(model_path, recipe, Path(work_dir), None, None, device, restart)
    with job:  # holds the work dir's lock until the programs are saved
        if not recipe.needs_calibration:
            return {"calibrated": False, "reason": f"recipe {recipe.name} uses no calibrated algorithm"}
        return _calibration_summary(_calibration_programs(layout, recipe, job, torch.device(device), progress),
                                    recipe)


LAYER_STEPS = "artifact-hashes"
"""What a layer's job step holds, part of the job fingerprint: the hashes of the layer's tensors in
the kept partial artifact, not a second copy of them (an older job folder, which holds the copy,
is refused with this named, and `--restart` starts it over)."""
LAYER_HASHES = "tensor_sha256"  # job-step metadata key: {canonical name: sha256 of its stored fields}
AMAX_KEY = "act_amax"  # job-step key prefix of a W8A8 Linear's calibrated input amax (so a resume keeps it)


def _amax_choice(recipe: Recipe) -> tuple[str, float]:
    return recipe.calibration.amax_choice if recipe.calibration is not None else ("max", 99.99)


def _amax_tensors(plan: QuantPlan, index: int, result) -> dict[str, torch.Tensor]:
    names = {cn.module_path(e.name): e.name for e in plan.entries
             if cn.layer_of(e.name) == index and cn.is_linear_weight(e.name)}
    return {f"{AMAX_KEY}.{names[p]}": torch.tensor(v, dtype=torch.float64) for p, v in result.act_amax.items()}


def _hidden_tensors(hidden) -> dict[str, torch.Tensor]:
    return {f"hidden.{p}.{c}": h.contiguous() for p, calls in enumerate(hidden) for c, h in enumerate(calls)}


def _restore_hidden(flat, programs, hidden):
    if not programs:
        return hidden
    return [[flat[f"hidden.{p}.{c}"] for c in range(len(prog.calls))] for p, prog in enumerate(programs)]


def _calibration_summary(programs, recipe: Recipe) -> dict:
    if not programs:
        return {"calibrated": False}
    by_task: dict[str, int] = {}
    for p in programs:
        by_task[p.task] = by_task.get(p.task, 0) + 1
    steps = sorted({c.step for p in programs for c in p.calls if c.step is not None})
    return {"calibrated": True, "samples_per_task": by_task, "tokens": sum(p.tokens for p in programs),
            "steps_observed": steps, "cfg_branches": sorted({c.cache for p in programs for c in p.calls})}


def _calibration_programs(layout, recipe: Recipe, job: JobState, device, progress: bool, plan: QuantPlan | None = None):
    """The recorded programs (saved in the job); before recording the rest, an estimate from a
    probe of the first runs, and of layer 0 when `plan` is given (``quant/estimate.py``)."""
    from lance_deploy.calibrate.collect import collect_calibration
    from lance_deploy.calibrate.store import load_programs, save_programs
    from lance_deploy.core.progress import shown
    from lance_deploy.quant.estimate import announce, estimate

    if job.is_done("calibration"):
        return load_programs(*job.load_step("calibration"))

    def on_probe(probe) -> None:
        if shown(progress):
            jobs = None if plan is None else _jobs(plan, 0)
            announce(estimate(probe, recipe.calibration.samples_per_task, layout=layout if jobs else None, jobs=jobs,
                              device=device))

    programs = collect_calibration(layout, recipe.calibration, device, progress, on_probe=on_probe)
    job.save_step("calibration", *save_programs(programs))
    job.done("calibration")
    return programs
