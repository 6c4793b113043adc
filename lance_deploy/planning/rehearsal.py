"""Rehearse a request on fake CUDA at release shapes and set its peaks beside the planner's.

`rehearse(model, task, budget=...)` builds the task's components from a release's headers as
fake tensors (a header-only release will do: `checkpoint.headers_only`), loads them where
`LancePipeline` would (the host when the plan streams, the device otherwise), and runs the real
pipeline, residency manager and pager under `runtime.fake_cuda.FakeCuda`: every CUDA kernel's
meta function runs at the real shapes, live device bytes are counted per planner phase, and the
pager's streams are checked for races. Seconds per request, no GPU.

The comparison is with what the planner says is *allocated*: its phase total without the
allowances for caching-allocator slack and library workspaces, which a rehearsal cannot see
(it counts tensors, not the allocator's segments or cuBLAS/cuDNN scratch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lance_deploy.checkpoint.layout import discover
from lance_deploy.config import LLMConfig
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.units import parse_size
from lance_deploy.formats import PackedTensor, layout, nbytes
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.model.lance import LanceLM
from lance_deploy.model.meta import build_on_meta
from lance_deploy.pipeline.components import Components
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.sequence import build_generation_sequence
from lance_deploy.pipeline.tasks import SPECS, VIDEO_TASKS, TaskRequest
from lance_deploy.pipeline.tokenizer import LanceTokenizer
from lance_deploy.planning.memory_plan import (
    MemoryPlan,
    ModelInfo,
    PlanRequest,
    make_plan,
)
from lance_deploy.planning.planner import FRAGMENTATION, WORKSPACE
from lance_deploy.runtime.fake_cuda import FakeCuda

UNLIMITED = 1 << 50  # "all resident": a budget nothing exceeds
CUDA = torch.device("cuda", 0)  # with its index: a CPU-only build has no current CUDA device to fill one in
PROMPT = ("a red fishing boat drifting on a calm blue river at dawn, mist over the water, pine trees on both "
          "banks, soft golden light, a heron standing in the shallows, ripples spreading from the bow, "
          "photorealistic, 35 mm, shallow depth of field")
QUESTION = "What is shown in this picture, and what is the person in the middle doing?"


@dataclass
class PhaseRow:
    phase: str
    rehearsed: int  # peak live fake-CUDA bytes (512 B blocks)
    planned: int  # the planner's allocated bytes: total - fragmentation - workspace
    planned_total: int  # the planner's total (what max_memory_reserved should stay under)
    ledger: int | None = None  # the runtime's own count of weights placed (paged runs)

    @property
    def ratio(self) -> float:
        return self.rehearsed / self.planned if self.planned else float("nan")


@dataclass
class Rehearsal:
    task: str
    budget: int | None
    recipe: str | None
    rows: list[PhaseRow]
    streamed: bool
    sdpa: dict = field(default_factory=dict)
    syncs: dict = field(default_factory=dict)
    engine_calls: dict = field(default_factory=dict)
    load_bytes: int = 0  # device bytes right after loading (the all-resident weights)

    @property
    def peak(self) -> int:
        return max(r.rehearsed for r in self.rows)


def request(task: str, height: int | None = None, width: int | None = None, frames: int | None = None,
            steps: int = 2, max_new_tokens: int = 8) -> TaskRequest:
    """A request at the given (or headline) size with random media, as benchmarks/memory.py runs it."""
    from lance_deploy.planning.workload import DEFAULT_FRAMES, DEFAULT_SIZE

    h, w = DEFAULT_SIZE.get(task, (480, 848))
    h, w = height or h, width or w
    f = frames or DEFAULT_FRAMES.get(task)
    rng = np.random.default_rng(0)
    req = TaskRequest(task=task, prompt=PROMPT, question=QUESTION, height=h, width=w, frames=f,
                      sampler=SamplerConfig(steps=steps), max_new_tokens=max_new_tokens)
    media = SPECS[task].media
    if media == "image":
        req.image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    elif media == "video":
        req.video, req.video_fps = rng.integers(0, 255, (f, h, w, 3), dtype=np.uint8), 12.0
    if task in ("i2v", "image_edit", "video_edit", "x2t_image", "x2t_video"):
        req.height = req.width = None if media else req.height
        req.frames = None if media == "video" else req.frames
    return req.validate()


def parse_task(spec: str) -> tuple[str, int | None, int | None, int | None]:
    """'t2v:480x848x121' -> ('t2v', 480, 848, 121); sizes left out are the task's headline size."""
    task, _, size = spec.partition(":")
    if task not in SPECS:
        raise LanceUsageError(f"task {spec!r}: expected one of {', '.join(SPECS)}, optionally :HxW[xFRAMES]")
    try:
        dims = [int(v) for v in size.split("x")] if size else []
    except ValueError:
        dims = [0]
    if not 0 < len(dims) <= 3 and size or any(d <= 0 for d in dims):
        raise LanceUsageError(f"task {spec!r}: the size must be HxW or HxWxFRAMES in positive integers")
    h, w, f = (dims + [None, None, None])[:3]
    return task, h, w, f


def text_tokens(tok: LanceTokenizer, req: TaskRequest) -> dict:
    """The planner's caption / question lengths for this request's texts."""
    if SPECS[req.task].gen:
        edit = req.task in ("image_edit", "video_edit")
        seq = build_generation_sequence(tok, req.task, req.prompt, target_grid=(2 if req.task == "i2v" else 1, 1, 1),
                                        vit_grids=[(1, 2, 2)] if edit else [],
                                        source_grids=[(1, 1, 1)] if edit else [])
        return {"caption_tokens": seq.split_lens[seq.caption_split]}
    return {"question_tokens": len(tok.encode(req.question)) + 1}


# -- fake components ---------------------------------------------------------------------------
def _fill(module: nn.Module, mode: FakeCuda, device, dtype, keep=lambda name: True) -> None:
    """Replace every meta parameter / buffer `keep` selects by a fake one on `device`."""
    for name, t in list(module.state_dict(keep_vars=True).items()):
        if not t.is_meta or not keep(name):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        fake = mode.empty(t.shape, dtype if t.is_floating_point() else t.dtype, device)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(fake, requires_grad=False)
        else:
            owner._buffers[attr] = fake


def loaded_formats(lm: nn.Module, formats: dict) -> dict:
    """The entries of `formats` whose Linear the task's model has: an understanding task builds
    no generation expert, so an artifact's gen Linears are neither loaded nor planned for it."""
    def has(path: str) -> bool:
        try:
            lm.get_submodule(path)
        except AttributeError:
            return False
        return True

    return {p: v for p, v in formats.items() if has(p)}


def _pack(module: nn.Module, formats: dict, mode: FakeCuda, device, dtype) -> None:
    """Swap each Linear named in `formats` ({module path: (FormatSpec, smooth?)}) for a QLinear
    holding fake packed fields of that format's layout (the artifact loader's modules)."""
    for path, (spec, smooth) in loaded_formats(module, formats).items():
        linear = module.get_submodule(path)
        shape = tuple(linear.weight.shape)
        fields = {f: mode.empty(s, dt, device) for f, (s, dt) in layout(shape, spec).items()}
        if smooth:
            fields["smooth"] = mode.empty((shape[1],), torch.float32, device)
        bias = None if linear.bias is None else mode.empty(linear.bias.shape, dtype, device)
        parent_path, _, attr = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, attr, QLinear(PackedTensor(spec=spec, shape=shape, **fields), bias))


def fake_components(model, task: str, mode: FakeCuda, *, device, dtype=torch.bfloat16,
                    formats: dict | None = None) -> Components:
    """The components `task` loads from the release at `model`, as fake tensors on `device`:
    configs, tokenizer and VAE widths from the files, no tensor data read."""
    from lance_deploy.checkpoint.loader import load_vae_state_dict
    from lance_deploy.model.vae import WanVAE
    from lance_deploy.model.vit import QwenViT

    spec = SPECS[task]
    lay = discover(model, variant="video" if task in VIDEO_TASKS else "image")
    cfg = LLMConfig.from_file(lay.config_file)
    lm = build_on_meta(lambda: LanceLM(cfg, with_gen=spec.gen, with_lm_head=spec.lm_head), lambda m: None)
    _pack(lm, formats or {}, mode, device, dtype)
    _fill(lm, mode, device, dtype)
    vit = vae = None
    if spec.vit:
        vit = build_on_meta(lambda: QwenViT(lay.vision_config(cfg)), lambda m: _fill(m, mode, device, dtype))
    if spec.vae_encoder or spec.vae_decoder:
        enc, dec = WanVAE.dims_from_state_dict(load_vae_state_dict(lay.require_vae()))
        keep = (("encoder.", "conv1.") if spec.vae_encoder else ()) + (("decoder.", "conv2.") if spec.vae_decoder else ())
        vae = build_on_meta(lambda: WanVAE(enc_dim=enc, dec_dim=dec),
                            lambda m: _fill(m, mode, device, dtype, keep=lambda n: n.startswith(keep)))
    tok = LanceTokenizer.from_dir(lay.tokenizer_dir)
    return Components(cfg=cfg, tokenizer=tok, lm=lm, vit=vit, vae=vae, layout=lay, variant=lay.variant)


# -- one rehearsal ---------------------------------------------------------------------------------
def packed_bytes(lm_formats: dict, shapes: dict) -> dict[str, int]:
    """{release key: stored bytes} of the packed Linears in `lm_formats` (what an artifact's
    manifest records for them: the format's fields, plus `smooth` where the recipe stores one)."""
    out = {}
    for path, (spec, smooth) in lm_formats.items():
        shape = shapes[path]
        out[f"{path}.weight"] = nbytes(shape, spec) + (4 * shape[1] if smooth else 0)
    return out


def planner_info(model, task: str, formats: dict | None = None) -> ModelInfo:
    """The planner's view of the release at `model` for `task`, with the Linears of `formats`
    at their packed bytes (as the manifest of an artifact of those formats would list them)."""
    info = ModelInfo.load(model, task)
    if not formats:
        return info
    spec = SPECS[task]
    from lance_deploy.formats.qlinear import expert_input_transients
    from lance_deploy.model.tree import expert_of

    lm = build_on_meta(lambda: LanceLM(info.cfg, with_gen=spec.gen, with_lm_head=spec.lm_head), lambda m: None)
    formats = loaded_formats(lm, formats)
    transients = expert_input_transients((expert_of(p), smooth, fmt.name if fmt.activations else None)
                                         for p, (fmt, smooth) in formats.items())
    return info.with_packed(packed_bytes(formats, {p: tuple(lm.get_submodule(p).weight.shape) for p in formats}),
                            transients)


def plan_request(model, req: TaskRequest, budget=None, *, formats: dict | None = None, recipe: str | None = None,
                 markers: str = "auto", dtype=torch.bfloat16, flash: bool = True) -> MemoryPlan:
    """The planner's `MemoryPlan` for exactly `req` (its caption / question lengths included)
    under `budget` (None: all resident); `formats` / `recipe` as in `rehearse`."""
    info = planner_info(model, req.task, formats)
    s = req.sampler
    b = UNLIMITED if budget is None else parse_size(budget)
    return make_plan(info, PlanRequest(req.task, b, req.height, req.width, req.frames, cfg=s.cfg_scale,
                                       steps=s.steps, dtype=dtype, recipe=recipe, flash=flash, preset=req.preset,
                                       max_new_tokens=req.max_new_tokens, markers=markers,
                                       **text_tokens(info.tokenizer, req)))


def rehearse(model, task: str, budget=None, *, req: TaskRequest | None = None, formats: dict | None = None,
             label: str | None = None, recipe: str | None = None, markers: str = "auto", dtype=torch.bfloat16,
             capability=(9, 0)) -> Rehearsal:
    """Plan `req` (default: `request(task)`) under `budget` (None: all resident), run it on fake
    CUDA, and return the rehearsed and planned peak of every phase.

    `formats` ({LanceLM module path: (FormatSpec, smooth?)}) packs those Linears as a quantized
    artifact would store them, and the planner plans exactly those stored bytes
    (`ModelInfo.with_packed`). `recipe` instead asks the planner about its hypothetical
    `--weights` recipe (fp8 / int8 / int4) over the same `formats`."""
    req = req or request(task)
    mp = plan_request(model, req, budget, formats=None if recipe else formats, recipe=recipe, markers=markers,
                      dtype=dtype, flash=capability >= (8, 0))
    if not mp.fits:
        raise LanceUsageError(f"{task} under {budget}: {mp.suggestion}")
    b = mp.plan.budget
    plan = mp if budget is not None else None
    mode = FakeCuda(capability)
    with mode:
        where = LancePipeline.load_device(plan, CUDA)
        comps = fake_components(model, task, mode, device=where, dtype=dtype, formats=formats)
        with mode.load():
            pipe = LancePipeline.from_components(comps, (task,), device=CUDA, dtype=dtype, memory_plan=plan)
        load_bytes = mode.memory.current
        pipe.phase_observers.append(mode.memory.set_phase)
        pipe(req, progress=False)
        peaks = mode.memory.peaks()
        ledger = pipe.residency.ledger.phase_peak if pipe.residency is not None else {}
    rows = [PhaseRow(name, peaks.get(name, 0), alloc, total, ledger.get(name))
            for name, (alloc, total) in planned_peaks(mp, pipe.residency is not None).items()]
    return Rehearsal(task, None if budget is None else b, label or recipe, rows, pipe.residency is not None,
                     dict(mode.sdpa), dict(mode.syncs), dict(mode.engine.calls), load_bytes)


def planned_peaks(mp, residency: bool) -> dict[str, tuple[int, int]]:
    """phase -> (allocated, total): the planner's peak of each phase for a run with or without
    phase residency. Allocated is what `torch.cuda.max_memory_allocated` (and the rehearsal's live
    tensors) should reach: the total less the allowances for caching-allocator slack and library
    workspaces, which only `max_memory_reserved` sees."""
    # without phase residency every loaded component is on the device in every phase (the
    # embeddings too): the planner's phase rest plus all weights, as MemoryPlan.resident_peak
    everything = None if residency else sum(mp.inventory.components.values())
    out = {}
    for p in mp.plan.phases:
        total = p.total if everything is None else p.total - p.weights - p.buffers + everything
        out[p.name] = (total - int(FRAGMENTATION * (p.activations + p.vae)) - WORKSPACE, total)
    return out
