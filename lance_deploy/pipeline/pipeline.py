"""`LancePipeline`: the Python API that mirrors `lance-deploy run`.

    pipe = LancePipeline.from_path("Lance_3B", task="t2i")
    out = pipe(TaskRequest(task="t2i", prompt="a red boat", height=256, width=256))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lance_deploy.artifact.load import is_artifact
from lance_deploy.checkpoint.layout import discover
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.components import (
    Components,
    load_artifact_components,
    load_components,
)
from lance_deploy.pipeline.denoise import DenoiseInputs, DenoiseTrace, denoise
from lance_deploy.pipeline.encode import EncodedMedia, encode_media
from lance_deploy.pipeline.progress import step_bar
from lance_deploy.pipeline.provenance import LoadInfo, output_metadata
from lance_deploy.pipeline.sequence import (
    build_generation_sequence,
    build_understanding_sequence,
)
from lance_deploy.pipeline.tasks import (
    GENERATION_TASKS,
    SPECS,
    VIDEO_TASKS,
    TaskRequest,
    covers,
    latent_grid,
    union_spec,
)
from lance_deploy.pipeline.understand import UnderstandInputs, understand

LATENT_CHANNELS = 48


@dataclass
class GenerationOutput:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    latents: list  # final latent per VAE block, [t, h, w, 48]; last = target
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    trace: DenoiseTrace | None = None
    meta: dict = field(default_factory=dict)  # the parameters the output files carry (`provenance`)


@dataclass
class UnderstandingOutput:
    text: str
    token_ids: list
    logits: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    prompt_tokens: int = 0  # the rendered prompt's length (usage reports)
    meta: dict = field(default_factory=dict)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LanceUsageError(f"--device {device}: no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise LanceUsageError(f"--dtype {dtype!r}: expected one of {', '.join(table)}")
    return table[dtype]


class LancePipeline:
    """Loads the components of one task and runs requests for it."""

    def __init__(self, components: Components, tasks: tuple[str, ...], device: torch.device, dtype: torch.dtype,
                 backend=None):
        self.c, self.tasks, self.device, self.dtype = components, tasks, device, dtype
        # None = PyTorch; else an `export.backend` object whose `query_fn(lm)` / `decode(vae, latent)`
        # replace the denoising query and the VAE decode (ONNX Runtime / TensorRT graphs).
        self.backend = backend
        self.spec = union_spec(tasks)
        self.load_seconds = 0.0
        self.phase = "load"  # the phase running now (named in out-of-memory messages)
        self.residency = None  # runtime.residency.ExpertResidency when a budget needs streaming
        self.spans: dict = {}
        self.phase_observers: list = []  # f(phase) before each phase's residency swap (rehearsals)
        self.load_info = LoadInfo()  # from_path fills it in: the model named in every output's metadata

    @classmethod
    def from_path(cls, path, task: str | tuple[str, ...], *, vit=None, vae=None, device=None,
                  dtype=None, backend=None, memory_plan=None, compile: bool = False) -> LancePipeline:
        """Discover the release layout under `path` and load what `task` (or every task of a tuple) needs.

        `backend`: None / "torch", or a backend object from `lance_deploy.export.backend.make_backend`
        (`lance_deploy.api.load_pipeline` takes the names "onnxruntime" / "tensorrt").
        `memory_plan`: a `planning.memory_plan.MemoryPlan` (see `planning.request.plan_residency`); when
        it streams any expert layer the weights load on the host and move to the device phase by phase.
        """
        tasks = (task,) if isinstance(task, str) else tuple(task)
        for t in tasks:
            if t not in SPECS:
                raise LanceUsageError(f"unknown task {t!r}; expected one of {', '.join(SPECS)}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        start = time.perf_counter()
        load_dev = cls.load_device(memory_plan, dev)
        video = any(t in VIDEO_TASKS for t in tasks)
        if is_artifact(path):
            components = load_artifact_components(path, union_spec(tasks), dtype=dt, device=load_dev)
            info = LoadInfo(path=Path(path), artifact=True)
        else:
            layout = discover(path, vit=vit, vae=vae, variant="video" if video else None)
            components = load_components(layout, union_spec(tasks), dtype=dt, device=load_dev)
            info = LoadInfo(path=layout.model_dir, layout=layout)
        if video and components.variant != "video":
            raise LanceUsageError(
                f"{', '.join(tasks)} needs the video model (Lance_3B_Video), but {path} holds the image model")
        if backend == "torch":
            backend = None
        elif isinstance(backend, str):
            raise LanceUsageError(f"backend {backend!r}: pass a backend object, or use "
                                  "lance_deploy.api.load_pipeline(..., backend=...) for a name")
        pipe = cls.from_components(components, tasks, device=dev, dtype=dt, backend=backend, memory_plan=memory_plan,
                                   compile=compile)
        pipe.load_seconds = time.perf_counter() - start
        pipe.load_info = info
        return pipe

    @staticmethod
    def load_device(memory_plan, device: torch.device) -> torch.device:
        """Where the weights load: the host when the plan moves components phase by phase (the
        residency manager places them), else the device itself."""
        paged = memory_plan is not None and memory_plan.needs_residency()
        return torch.device("cpu") if paged else device

    @classmethod
    def from_components(cls, components: Components, tasks: tuple[str, ...], *, device, dtype, backend=None,
                        memory_plan=None, compile: bool = False) -> LancePipeline:
        """A pipeline over components already loaded at `load_device(memory_plan, device)`;
        `compile` wraps each backbone layer in torch.compile (`runtime.compile`)."""
        dev = resolve_device(device) if not isinstance(device, torch.device) else device
        pipe = cls(components, tasks, dev, dtype, backend)
        if dev.type == "cuda":  # fused-kernel layouts, built once here (host copies of paged layers too)
            from lance_deploy.formats.qlinear import QLinear

            for m in components.lm.modules():
                if isinstance(m, QLinear):
                    m.prepare(dev)
        if memory_plan is not None and memory_plan.needs_residency():
            from lance_deploy.runtime.residency import spans_for

            pipe.attach_residency(lambda r: spans_for(memory_plan.plan, r), memory_plan.plan.budget)
        if compile:
            from lance_deploy.runtime.compile import compile_layers

            compile_layers(components.lm)
        return pipe

    def attach_residency(self, spans, budget: int | None = None):
        """Manage device residency by span (the planner's phases: 'encode_vit', 'prefill', 'denoise',
        ...; see `runtime.residency`): `spans` is a list of
        `runtime.residency.Span` or a function of the `ExpertResidency` returning one (so spans
        can be sized on the real weight bytes). The ledger refuses to exceed `budget` bytes."""
        from lance_deploy.runtime.pager import ByteLedger
        from lance_deploy.runtime.residency import ExpertResidency

        res = ExpertResidency(self.c.lm, self.device, ByteLedger(budget), vit=self.c.vit, vae=self.c.vae)
        self.residency = res
        self.spans = {s.name: s for s in (spans(res) if callable(spans) else spans)}
        return res

    def _enter(self, phase: str) -> None:
        self.phase = phase
        for observe in self.phase_observers:
            observe(phase)
        if self.residency is not None and phase in self.spans:
            self.residency.enter(self.spans[phase])

    def __call__(self, req: TaskRequest, *, progress: bool = True, trace: bool = False, on_step=None,
                 on_token=None):
        """Run `req`. `on_step(done, total)` follows each denoising / decode step and may raise to stop
        the run there (a server's cancel); `on_token(id)` sees each decoded x2t id (token streaming)."""
        if not covers(self.spec, req.task):
            raise LanceUsageError(f"this pipeline was loaded for {', '.join(self.tasks)}, not {req.task}")
        req.validate(tokenizer=self.c.tokenizer)
        if req.task in GENERATION_TASKS:
            return self._generate(req, progress, trace, on_step)
        return self._understand(req, progress, on_step, on_token)

    # -- generation -------------------------------------------------------------------------
    def _generate(self, req: TaskRequest, progress: bool, trace: bool, on_step=None) -> GenerationOutput:
        timings = {"load_s": self.load_seconds}
        t0 = time.perf_counter()
        media = encode_media(self.c, req, self.device, self.dtype, on_phase=self._enter)
        target = self._target_grid(req, media)
        seq = build_generation_sequence(
            self.c.tokenizer, req.task, req.prompt, target_grid=target,
            vit_grids=media.vit_grids, source_grids=[tuple(s.shape[:3]) for s in media.source_latents],
            negative_prompt=req.negative_prompt,
        )
        timings["encode_s"] = time.perf_counter() - t0
        latents = self._initial_latents(req, seq, media)
        cfg = req.sampler.cfg_scale > 1.0
        inp = _denoise_inputs(seq, latents, media.vit_tokens, uncond=cfg)
        if cfg and seq.negative is not None:
            inp.negative = _denoise_inputs(seq.negative, latents, media.vit_tokens, uncond=False)
        query_fn = None if self.backend is None else self.backend.query_fn(self.c.lm)  # may export graphs first
        t1 = time.perf_counter()
        rec = DenoiseTrace() if trace else None
        with step_bar(req.sampler.steps, f"{req.task} denoise", progress) as tick:
            x = denoise(self.c.lm, inp, req.sampler, progress=_ticks(tick, on_step, req.sampler.steps), trace=rec,
                        query_fn=query_fn, on_phase=self._enter)
        timings["denoise_s"] = time.perf_counter() - t1
        timings["s_per_step"] = timings["denoise_s"] / req.sampler.steps
        blocks = _split_blocks(x, [b.grid for b in seq.vae_blocks])
        t2 = time.perf_counter()
        from lance_deploy.media.io import to_uint8

        self._enter("vae_decode")
        latent = blocks[-1].to(self.device, self.dtype)
        pixels = self.c.vae.decode(latent) if self.backend is None else self.backend.decode(self.c.vae, latent)
        frames = to_uint8(pixels.float().cpu())
        timings["vae_decode_s"] = time.perf_counter() - t2
        return GenerationOutput(frames=frames, latents=[b.cpu() for b in blocks], timings=timings,
                                notes=req.notes + media.notes, trace=rec,
                                meta=self.output_metadata(req, frames.shape[:3]))

    def output_metadata(self, req: TaskRequest, shape=(None, None, None)) -> dict:
        """The parameters JSON of an output of `req` with `shape` = (frames, height, width)."""
        n, h, w = (None if v is None else int(v) for v in shape)
        return output_metadata(req, self.load_info, backend=getattr(self.backend, "name", None) or "torch",
                               dtype=str(self.dtype).removeprefix("torch."), device=self.device.type,
                               frames=n, height=h, width=w)

    def _target_grid(self, req: TaskRequest, media: EncodedMedia) -> tuple[int, int, int]:
        if req.task in ("t2i", "t2v"):
            return latent_grid(req.frames or 1, req.height, req.width)
        if req.task == "i2v":
            _, h, w, _ = media.cond_latent.shape
            return (req.frames - 1) // 4 + 1, h, w
        return tuple(media.source_latents[-1].shape[:3])  # edits: the source's size

    def _initial_latents(self, req: TaskRequest, seq, media: EncodedMedia) -> torch.Tensor:
        """Noise over every VAE token; condition rows then take their clean latents."""
        n = int(seq.vae_indexes.numel())
        if req.init_noise is not None:
            noise = req.init_noise.float()
            if tuple(noise.shape) != (n, LATENT_CHANNELS):
                raise LanceUsageError(
                    f"--init-noise: tensor 'noise' has shape {tuple(noise.shape)}, expected ({n}, {LATENT_CHANNELS})"
                )
        else:
            gen = torch.Generator().manual_seed(req.seed)
            noise = torch.randn(n, LATENT_CHANNELS, generator=gen)
        latents, offset, sources = noise.clone(), 0, iter(media.source_latents)
        for block in seq.vae_blocks:
            t, h, w = block.grid
            if block.role == "source":
                latents[offset : offset + t * h * w] = next(sources).reshape(-1, LATENT_CHANNELS).float().cpu()
            elif block.clean_frames:  # i2v: the first latent frame is the encoded image
                k = block.clean_frames * h * w
                latents[offset : offset + k] = media.cond_latent.reshape(-1, LATENT_CHANNELS)[:k].float().cpu()
            offset += t * h * w
        return latents

    # -- understanding ----------------------------------------------------------------------
    def _understand(self, req: TaskRequest, progress: bool, on_step=None, on_token=None) -> UnderstandingOutput:
        timings = {"load_s": self.load_seconds}
        t0 = time.perf_counter()
        media = encode_media(self.c, req, self.device, self.dtype, on_phase=self._enter)
        tok = self.c.tokenizer
        seq = build_understanding_sequence(tok, req.system, req.question, media.vit_grids[0], req.max_new_tokens)
        inp = UnderstandInputs(prompt_ids=seq.prompt_ids, split_lens=seq.split_lens, attn_modes=seq.attn_modes,
                               rope_pos=seq.rope_pos, vit_indexes=seq.vit_indexes, vit_tokens=media.vit_tokens)
        timings["encode_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        with step_bar(req.max_new_tokens, f"{req.task} decode", progress) as tick:
            res = understand(self.c.lm, inp, max_new_tokens=req.max_new_tokens, eos_id=tok.im_end,
                             vocab_limit=len(tok), keep_logits=True, on_phase=self._enter, on_token=on_token,
                             progress=_ticks(tick, on_step, req.max_new_tokens))
        timings["decode_s"] = time.perf_counter() - t1
        ids = res.token_ids[:-1] if res.token_ids and res.token_ids[-1] == tok.im_end else res.token_ids
        return UnderstandingOutput(text=tok.decode(ids), token_ids=res.token_ids, logits=res.logits,
                                   prompt_tokens=int(seq.prompt_ids.numel()),
                                   timings=timings, notes=req.notes + media.notes, meta=self.output_metadata(req))




def _denoise_inputs(seq, latents, vit_tokens, *, uncond: bool) -> DenoiseInputs:
    return DenoiseInputs(
        token_ids=seq.token_ids, split_lens=seq.split_lens, attn_modes=seq.attn_modes,
        token_modality=seq.token_modality, rope_pos=seq.rope_pos,
        uncond_rope_pos=seq.uncond_rope_pos if uncond else None,
        text_indexes=seq.text_indexes, vae_indexes=seq.vae_indexes, target_indexes=seq.target_indexes,
        vae_grids=[b.grid for b in seq.vae_blocks], latents=latents,
        vit_indexes=seq.vit_indexes, vit_tokens=vit_tokens,
    )


def _ticks(bar, on_step, total: int):
    """One per-step callback for the progress bar and the caller's `on_step(done, total)`."""
    if on_step is None:
        return bar

    def tick(i: int) -> None:
        if bar is not None:
            bar(i)
        on_step(i + 1, total)

    return tick


def _split_blocks(x: torch.Tensor, grids) -> list[torch.Tensor]:
    out, start = [], 0
    for t, h, w in grids:
        out.append(x[start : start + t * h * w].reshape(t, h, w, LATENT_CHANNELS))
        start += t * h * w
    return out
