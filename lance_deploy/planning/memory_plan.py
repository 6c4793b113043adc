"""One memory plan end to end: model facts (headers + configs) + a request -> `MemoryPlan`.

`ModelInfo.load` reads the safetensors headers, the VAE pickle index (mmap, no data), the configs
and the tokenizer; `make_plan` builds the workload, the phase demands, the weight inventory and
the residency plan, and when nothing fits searches for the concrete way out (a recipe, tiling,
fewer frames / a smaller size, or the minimum budget) and puts it in `suggestion`.

Predicted peaks, bf16 release, reference sizes, default 256-token caption, CFG 4, VAE tiling auto
(GiB; all-resident peak phase, then the plan at 16 / 12 / 8 GiB):

| task              | all resident: weights + KV + act. (+VAE) = peak | 16 GiB   | 12 GiB             | 8 GiB                        |
|-------------------|--------------------------------------------------|----------|--------------------|------------------------------|
| t2i 768²          | denoise 10.35 + 0.01 + 0.19 = 10.63              | resident | resident           | und 21/36 streamed per step  |
| image_edit 768²   | denoise 10.35 + 0.22 + 0.19 = 10.85              | resident | resident           | und 22/36 (prefill: gen 22)  |
| t2v 480x848x121   | denoise 10.35 + 0.01 + 4.04 = 14.87              | resident | und 23/36          | und 36 + gen 16              |
| video_edit 480p69 | denoise 10.35 + 3.10 + 2.34 = 16.33              | und 5/36 | und 33/36          | und 36 + gen 27              |
| x2t_image 768²    | text_decode 5.75 + 0.03 + 0.15 = 6.01            | resident | resident           | resident                     |
| x2t_video 480p69  | prefill 5.17 + 0.56 + 1.14 = 7.17                | resident | resident           | resident                     |

(totals include carried tensors and the allocator allowance; with `--recipe int8` t2v peaks at
9.75 GiB all resident and image tasks at 5.5-5.7 GiB.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from lance_deploy.checkpoint.layout import ReleaseLayout, discover
from lance_deploy.config import LLMConfig, VisionConfig
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.tasks import SPECS, TASKS, VIDEO_TASKS, union_spec
from lance_deploy.pipeline.tokenizer import LanceTokenizer
from lance_deploy.planning.memory_model import LLMShape, ViTShape
from lance_deploy.planning.phases import ModelDims, RunOptions, phase_demands
from lance_deploy.planning.planner import Plan, plan
from lance_deploy.planning.weights import (
    EXPERTS,
    RECIPES,
    TensorEntry,
    WeightInventory,
    apply_recipe,
    compact_layers,
    dtype_bytes,
    inventory,
    manifest_entries,
    release_entries,
)
from lance_deploy.planning.workload import Workload, build_workload


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: a task, its size, the budget and the run options."""

    task: str
    budget: int
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    cfg: float = 4.0
    steps: int = 30
    dtype: torch.dtype = torch.bfloat16
    recipe: str | None = None  # hypothetical: expert Linear weights packed (fp8 / int8 / int4)
    tiling: bool | None = None  # VAE tiling; None = auto as the pipeline
    flash: bool = True
    caption_tokens: int = 256
    negative_tokens: int = 0
    question_tokens: int = 64
    max_new_tokens: int = 256
    preset: str | None = None
    markers: str = "auto"  # how the denoising marker rows reach the und expert (planner.MARKER_POLICIES)


@dataclass
class ModelInfo:
    """Everything the planner reads from a release or a quantized artifact, once: no tensor data.

    `layout` is the release layout, or None for an artifact folder (`exported/<name>/`), whose
    `manifest` then gives the per-tensor bytes (packed fields at their stored size, plain tensors
    at the load dtype) and whose folder holds llm_config.json and the tokenizer."""

    layout: ReleaseLayout | None
    cfg: LLMConfig
    vision: VisionConfig
    tokenizer: LanceTokenizer
    manifest: object | None = None  # export.artifact_manifest.ArtifactManifest for an artifact
    stored: dict = field(default_factory=dict)  # release key -> packed bytes (`with_packed`)
    linear_input: tuple[int, int] = (0, 0)  # with `stored`: (und, gen) `input_transient_bytes` (`with_packed`)
    _entries: dict = field(default_factory=dict)
    _inventories: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path, task: str, vit=None, vae=None) -> ModelInfo:
        """Discover the layout exactly as `LancePipeline.from_path` does for `task`."""
        if task not in TASKS:
            raise LanceUsageError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        from lance_deploy.artifact.load import is_artifact

        if is_artifact(path):
            return cls._load_artifact(path, task)
        layout = discover(path, vit=vit, vae=vae, variant="video" if task in VIDEO_TASKS else "image")
        cfg = LLMConfig.from_file(layout.config_file)
        layout.check_keys(cfg)  # a plan of a release with missing or transposed tensors would be wrong
        return cls(layout, cfg, layout.vision_config(cfg), LanceTokenizer.from_dir(layout.tokenizer_dir))

    @classmethod
    def _load_artifact(cls, path, task: str) -> ModelInfo:
        """An artifact folder, read as `pipeline.components.load_artifact_components` reads it
        (manifest, llm_config.json, tokenizer; the ViT config is the LLM config's)."""
        from pathlib import Path

        from lance_deploy.artifact.reader import ArtifactReader
        from lance_deploy.pipeline.components import artifact_tokenizer

        path = Path(path)
        reader = ArtifactReader(path)
        try:
            manifest = reader.manifest
        finally:
            reader.close()
        variant = manifest.source.get("variant", "image")
        if task in VIDEO_TASKS and variant != "video":
            raise LanceUsageError(
                f"{task} needs the video model (Lance_3B_Video), but {path} holds the image model")
        cfg = reader.config()
        return cls(None, cfg, cfg.vision, artifact_tokenizer(reader), manifest)

    @property
    def variant(self) -> str | None:
        return self.manifest.source.get("variant", "image") if self.manifest is not None else None

    @property
    def packed(self) -> bool:
        """Whether the weights themselves are stored packed (an artifact with quantized tensors)."""
        if self.stored:
            return True
        return self.manifest is not None and any(t.spec is not None for t in self.manifest.tensors)

    def input_transient(self) -> tuple[int, int]:
        """(und, gen): per input element, the most a packed Linear of that expert holds beyond its
        input per call (`formats.qlinear.input_transient_bytes`, from the manifest's specs and smooth fields)."""
        if self.manifest is None:
            return self.linear_input
        from lance_deploy.checkpoint.canonical import expert_of
        from lance_deploy.formats.qlinear import expert_input_transients

        return expert_input_transients((expert_of(t.name), "smooth" in t.fields,
                                        t.spec.get("name") if t.spec.get("activations") else None)
                                       for t in self.manifest.tensors if t.spec is not None)

    def with_packed(self, stored: dict[str, int], linear_input: tuple[int, int] = (0, 0)) -> ModelInfo:
        """This release as an artifact storing the tensors named in `stored` (release keys) packed
        at those byte counts would plan (what its manifest would say; the rest at the load
        dtype): the rehearsal plans a recipe's exact formats without quantizing 12 GB."""
        return ModelInfo(self.layout, self.cfg, self.vision, self.tokenizer, self.manifest, dict(stored), linear_input)

    def _has(self, part: str) -> bool:
        if self.layout is not None:
            return {"vit": self.layout.has_bundled_vit or self.layout.vit_file is not None,
                    "vae": self.layout.vae_file is not None}[part]
        return any(t.name.startswith(part + ".") for t in self.manifest.tensors)

    def _require(self, part: str) -> None:
        if self.layout is not None:
            (self.layout.require_vit if part == "vit" else self.layout.require_vae)()
        elif not self._has(part):
            raise LanceUsageError(f"this quantized artifact holds no {part.upper()} tensors ({part}.*)")

    def entries(self, dtype: torch.dtype) -> list[TensorEntry]:
        """Every tensor any task could load, at `dtype` (cached per dtype)."""
        if dtype not in self._entries:
            if self.manifest is not None:
                self._entries[dtype] = manifest_entries(self.manifest, dtype)
            else:
                everything = union_spec(TASKS)
                entries = release_entries(self.layout, dtype, replace(
                    everything, vit=self._has("vit"), vae_encoder=self._has("vae"), vae_decoder=self._has("vae")))
                self._entries[dtype] = [replace(e, nbytes=self.stored[e.name]) if e.name in self.stored else e
                                        for e in entries]
        return self._entries[dtype]

    def inventory(self, task: str, dtype: torch.dtype, recipe: str | None = None) -> WeightInventory:
        spec = SPECS[task]
        if spec.vit:
            self._require("vit")  # the same error as the loader when it is missing
        if spec.vae_encoder or spec.vae_decoder:
            self._require("vae")
        key = (task, dtype, recipe)
        if key not in self._inventories:
            label = recipe or str(dtype).removeprefix("torch.")
            if recipe is None and self.manifest is not None:
                label = f"{self.manifest.recipe.get('name') or 'artifact'} (stored) + {label}"
            entries = apply_recipe(self.entries(dtype), recipe)
            inv = inventory(entries, spec, label)
            if spec.gen:  # the marker copies the denoise phase may use instead of streaming und layers
                inv = replace(inv, compact={f: compact_layers(entries, f) for f in ("int8", "int4")})
            self._inventories[key] = inv
        return self._inventories[key]

    def dims(self, dtype: torch.dtype) -> ModelDims:
        enc, dec = _vae_dims(self.entries(dtype))
        return ModelDims(LLMShape.of(self.cfg), ViTShape.of(self.vision), enc, dec)


def _vae_dims(entries: list[TensorEntry]) -> tuple[int, int]:
    """(enc_dim, dec_dim) from the VAE's first convs (release defaults 160 / 256 when absent)."""
    shapes = {e.name: e.shape for e in entries if e.component.startswith("vae")}
    enc = shapes.get("encoder.conv1.weight", (160,))[0]
    dec = shapes.get("decoder.conv1.weight", (1024,))[0] // 4
    return int(enc), int(dec)


@dataclass
class MemoryPlan:
    """The planner's answer for one request (what `memory-plan` prints)."""

    request: PlanRequest
    workload: Workload
    inventory: WeightInventory
    plan: Plan
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)

    def needs_streaming(self) -> bool:
        """Whether any phase streams an expert layer or uses a marker copy (else all stays resident)."""
        return any(p.markers or any(p.streamed.values()) for p in self.plan.phases)

    @property
    def resident_peak(self) -> int:
        """The peak with every component the task loads on the device at once, embeddings included
        (what a pipeline without phase residency holds): all weights + the busiest phase's rest."""
        return sum(self.inventory.components.values()) + max(p.total - p.weights - p.buffers
                                                              for p in self.plan.phases)

    def needs_residency(self) -> bool:
        """Whether the run must move components phase by phase: it streams, or the phases fit the
        budget one at a time but not all together (the rehearsal found image_edit at 12 GiB
        planned as fitting while the pipeline kept 14.2 GiB resident)."""
        return self.needs_streaming() or self.resident_peak > self.plan.budget

    @property
    def fits(self) -> bool:
        return self.plan.fits

    def to_dict(self) -> dict:
        r, w, p = self.request, self.workload, self.plan
        return {
            "task": r.task, "fits": p.fits, "budget_bytes": r.budget, "min_budget_bytes": p.min_budget,
            "peak_bytes": p.peak.total, "peak_phase": p.peak.name, "dtype": str(r.dtype).removeprefix("torch."),
            "recipe": r.recipe, "cfg": r.cfg, "tiling": r.tiling, "flash_attention": r.flash,
            "workload": {"target_grid": w.target_grid, "target_tokens": w.target_tokens,
                         "context_tokens": w.context_tokens, "uncond_context_tokens": w.uncond_context_tokens,
                         "vit_grid": w.vit_grid, "vit_tokens": w.vit_tokens, "encode_pixels": w.encode_pixels,
                         "forwards": w.forwards, "max_new_tokens": w.max_new_tokens},
            "weights": dict(self.inventory.components), "layer_bytes": {e: self.inventory.layer_bytes(e) for e in EXPERTS},
            "marker_tokens": p.marker_mode(),
            "phases": [{"name": x.name, "weights": x.weights, "stream_buffers": x.buffers, "kv": x.kv,
                        "activations": x.activations, "vae": x.vae, "carried": x.carried, "overhead": x.overhead,
                        "total": x.total, "fits": x.total <= r.budget, "resident": x.resident,
                        "streamed_layers": x.streamed, "streamed_bytes": x.streamed_bytes,
                        "marker_copy": x.markers, "marker_layers": x.marker_layers,
                        "est_slowdown": None if x.slowdown is None else round(x.slowdown, 3),
                        "transfer_s": round(x.transfer_s, 3), "plan": x.describe()} for x in p.phases],
            "suggestion": self.suggestion, "notes": self.notes + list(w.notes),
        }


def _plan_once(info: ModelInfo, r: PlanRequest) -> tuple[Workload, WeightInventory, Plan]:
    work = build_workload(info.tokenizer, r.task, r.height, r.width, r.frames, cfg_scale=r.cfg, steps=r.steps,
                          preset=r.preset, caption_tokens=r.caption_tokens, question_tokens=r.question_tokens,
                          max_new_tokens=r.max_new_tokens, negative_tokens=r.negative_tokens)
    b = dtype_bytes(r.dtype)
    opts = RunOptions(b=b, flash=r.flash and r.dtype in (torch.bfloat16, torch.float16), tiling=r.tiling,
                      linear_input=info.input_transient())
    inv = info.inventory(r.task, r.dtype, r.recipe)
    # a quantized Linear may dequantize its weight per call: one [11008, 2048] scratch at the compute dtype
    extra = b * info.cfg.intermediate_size * info.cfg.hidden_size if r.recipe or info.packed else 0
    return work, inv, plan(phase_demands(work, info.dims(r.dtype), opts), inv, r.budget, extra, r.markers)


def make_plan(info: ModelInfo, r: PlanRequest) -> MemoryPlan:
    """Plan `r`; when nothing fits, `suggestion` says what would."""
    work, inv, p = _plan_once(info, r)
    out = MemoryPlan(r, work, inv, p)
    if not r.flash or r.dtype == torch.float32:
        out.notes.append("attention without flash kernels: SDPA's math path is quadratic in the query length")
    if not p.fits:
        from lance_deploy.planning.advice import suggest

        out.suggestion = suggest(info, r, p, inv, lambda req: _plan_once(info, req)[2])
    return out


__all__ = ["RECIPES", "MemoryPlan", "ModelInfo", "PlanRequest", "make_plan"]
