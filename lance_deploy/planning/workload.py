"""What one request puts through the model: token counts, prefill splits, media sizes, forwards.

Sizes follow the pipeline exactly: t2i/t2v take --height/--width as the output size; media tasks
take them as the *input's* size, bucketed like `media.preprocess` (VAE bucket at the preset's VAE
side, crop to 16; ViT bucket at the ViT side, crop to 28). Text around the vision blocks is counted
with the checkpoint's own tokenizer through the real sequence builders (built once with 1-cell
grids, then the block sizes are substituted); the caption / question length is an input
(`caption_tokens`, default 256, a long caption).

Reference workloads (lance.md §6.3). Text counts here are the tiny golden tokenizer's with the
default 256-token caption / 64-token question; the release's Qwen tokenizer gives fewer:

| task              | blocks (latent t x h x w / ViT grid)  | target | ViT tokens (patches) | context / uncond |
|-------------------|---------------------------------------|--------|----------------------|------------------|
| t2i 768²          | out 1x48x48                           | 2,304  | -                    | 312 / 56         |
| t2v 480x848x121   | out 31x30x53                          | 49,290 | -                    | 330 / 74         |
| i2v 480x848 61 f  | in 480x848 -> out 16x30x53            | 25,440 | -                    | 330 / 74         |
| image_edit 768²   | src 1x48x48; ViT 672² -> 1x48x48      | 2,304  | 576 (2,304)          | 3,268 / 3,012    |
| video_edit 480p69 | src 18x30x53; ViT 448x812, 70 f       | 28,620 | 16,240 (64,960)      | 45,248 / 44,992  |
| x2t_image 768²    | ViT 672² -> 1x48x48                   | -      | 576 (2,304)          | 676 (+256 decode)|
| x2t_video 480p69  | ViT 448x812, 70 f -> 35x32x58         | -      | 16,240 (64,960)      | 16,338 (+256)    |
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.media.preprocess import PRESETS, VAE_CROP, VIT_CROP, bucket_size
from lance_deploy.pipeline.sampler import SamplerConfig, flow_schedule
from lance_deploy.pipeline.tasks import DEFAULT_PRESET, DEFAULT_SYSTEM, MAX_FRAMES, SPECS, TASKS, TaskSpec, latent_grid

MAX_INPUT_FRAMES = 69  # 6 s at 12 fps, as 4k+1: the most frames `sample_frame_indices` keeps
DEFAULT_SIZE = {"t2i": (768, 768), "image_edit": (768, 768), "x2t_image": (768, 768)}  # others 480x848
DEFAULT_FRAMES = {"t2v": 121, "i2v": 61, "video_edit": 69, "x2t_video": 69}
BLOCK_MODES = {"full": "vit", "full_noise": "source", "noise": "target"}


@dataclass(frozen=True)
class Split:
    """One prefill chunk: `n` tokens, attention mode, rows through the generation expert."""

    n: int
    mode: str  # 'causal' | 'full' | 'full_noise'
    gen_rows: int = 0
    caption: bool = False


@dataclass(frozen=True)
class Workload:
    """Everything the memory formulas need about one request."""

    task: str
    spec: TaskSpec
    prefix: tuple[Split, ...]  # the conditional prefill, in order
    target_grid: tuple[int, int, int] | None = None  # latent (t, h, w) of the output
    vae_rows: int = 0  # every latent row embedded each step (edit source + target)
    encode_pixels: tuple[int, int, int] | None = None  # (frames, H, W) into the VAE encoder
    vit_grid: tuple[int, int, int] | None = None  # ViT grid_thw in patches (T/2, H/14, W/14)
    steps: int = 0
    cfg_steps: int = 0  # steps that also run the uncond branch
    max_new_tokens: int = 0
    negative_tokens: int = 0  # a negative prompt's caption in the uncond branch (upstream's branch has none)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def target_tokens(self) -> int:
        return 0 if self.target_grid is None else self.target_grid[0] * self.target_grid[1] * self.target_grid[2]

    @property
    def query_tokens(self) -> int:
        """The denoising query: [vision_start, latents, vision_end]."""
        return self.target_tokens + 2

    @property
    def context_tokens(self) -> int:
        return sum(s.n for s in self.prefix)

    @property
    def uncond_context_tokens(self) -> int:
        return sum(s.n for s in self.prefix if not s.caption) + self.negative_tokens

    @property
    def cfg(self) -> bool:
        return self.cfg_steps > 0

    @property
    def vit_patches(self) -> int:
        return 0 if self.vit_grid is None else self.vit_grid[0] * self.vit_grid[1] * self.vit_grid[2]

    @property
    def vit_tokens(self) -> int:
        return self.vit_patches // 4

    @property
    def forwards(self) -> int:
        """Transformer forwards of the denoising loop (cond every step + uncond on CFG steps)."""
        return self.steps + self.cfg_steps


def _vae_size(h: int, w: int, side: int) -> tuple[int, int]:
    bh, bw = bucket_size(h, w, side)
    return bh - bh % VAE_CROP, bw - bw % VAE_CROP


def _vit_grid(h: int, w: int, side: int, frames: int) -> tuple[int, int, int]:
    bh, bw = bucket_size(h, w, side)
    t = frames + frames % 2 if frames > 1 else 2  # an image is repeated to 2 frames; odd clips get one more
    return t // 2, (bh - bh % VIT_CROP) // 14, (bw - bw % VIT_CROP) // 14


def _frames(task: str, frames: int | None, notes: list) -> int:
    spec = SPECS[task]
    if task not in DEFAULT_FRAMES:
        if frames not in (None, 1):
            notes.append(f"--frames {frames} ignored: {task} works on one image")
        return 1
    f = DEFAULT_FRAMES[task] if frames is None else frames
    limit = MAX_INPUT_FRAMES if spec.media == "video" else MAX_FRAMES
    if f < 1:
        raise LanceUsageError(f"--frames {f} must be at least 1")
    if f > limit and spec.media != "video":
        raise LanceUsageError(f"--frames {f} is outside 1..{limit} (the model's limit)")
    if f > limit:
        notes.append(f"--frames {f}: the input is sampled to at most {limit} frames (6 s at 12 fps)")
        f = limit
    real = (f - 1) // 4 * 4 + 1
    if real != f:
        notes.append(f"--frames {f} is not 4k+1; using {real}")
    return real


def _schedule(steps: int, cfg_scale: float) -> int:
    sampler = SamplerConfig(steps=steps, cfg_scale=cfg_scale)
    t, _ = flow_schedule(steps, sampler.shift)
    return sum(sampler.cfg_active(float(x)) for x in t)


@functools.lru_cache(maxsize=256)
def text_splits(tok, task: str, caption_tokens: int, question_tokens: int, max_new: int) -> tuple[Split, ...]:
    """Prefill splits with 1-cell blocks and the caption / question at their assumed lengths
    (cached: the suggestion search re-plans the same text many times)."""
    from lance_deploy.pipeline.sequence import build_generation_sequence, build_understanding_sequence

    placeholder = "ZQXJ"  # a caption whose tokens occur nowhere in the template
    ph = len(tok.encode(placeholder))
    if SPECS[task].gen:
        edit = task in ("image_edit", "video_edit")
        seq = build_generation_sequence(
            tok, task, placeholder, target_grid=(2 if task == "i2v" else 1, 1, 1),
            vit_grids=[(1, 2, 2)] if edit else [], source_grids=[(1, 1, 1)] if edit else [])
        out = []
        for i, (n, mode) in enumerate(zip(seq.split_lens[: seq.target_split], seq.attn_modes)):
            caption = i == seq.caption_split
            out.append(Split(caption_tokens if caption else n, mode, caption=caption))
        return tuple(out)
    seq = build_understanding_sequence(tok, DEFAULT_SYSTEM[task], placeholder, (1, 2, 2), max_new)
    lens = list(seq.split_lens)
    lens[-1] += question_tokens - ph - 1  # the last prompt token is the first decode query, not prefilled
    return tuple(Split(n, mode) for n, mode in zip(lens, seq.attn_modes))


def build_workload(tok, task: str, height: int | None = None, width: int | None = None, frames: int | None = None,
                   *, cfg_scale: float = 4.0, steps: int = 30, preset: str | None = None,
                   caption_tokens: int = 256, question_tokens: int = 64, max_new_tokens: int = 256,
                   negative_tokens: int = 0) -> Workload:
    """The workload of one request; `tok` is the checkpoint's `LanceTokenizer`."""
    if task not in TASKS:
        raise LanceUsageError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    spec, notes = SPECS[task], []
    h, w = DEFAULT_SIZE.get(task, (480, 848))
    h, w = height or h, width or w
    for name, v in (("--height", h), ("--width", w)):
        if v <= 0 or (task in ("t2i", "t2v") and v % 16):
            raise LanceUsageError(f"{name} {v} is not a positive multiple of 16")
    f = _frames(task, frames, notes)
    p = PRESETS[preset or DEFAULT_PRESET[task]]
    kw: dict = {"task": task, "spec": spec, "max_new_tokens": 0 if spec.gen else max_new_tokens}
    if spec.gen:
        kw.update(steps=steps, cfg_steps=_schedule(steps, cfg_scale), negative_tokens=negative_tokens)
    splits = text_splits(tok, task, caption_tokens, question_tokens, max_new_tokens)
    source = None
    if task in ("t2i", "t2v"):
        kw["target_grid"] = latent_grid(f, h, w)
    elif task == "i2v":
        vh, vw = _vae_size(h, w, p.vae_side)
        kw["encode_pixels"] = (1, vh, vw)
        kw["target_grid"] = latent_grid(f, vh, vw)
        notes.append(f"input {h}x{w} -> bucket {vh}x{vw}")
    elif spec.vae_encoder:  # edits: the target takes the source's size
        vh, vw = _vae_size(h, w, p.vae_side)
        kw["encode_pixels"] = (f, vh, vw)
        source = kw["target_grid"] = latent_grid(f, vh, vw)
        notes.append(f"input {h}x{w} -> VAE bucket {vh}x{vw}")
    if spec.vit:
        kw["vit_grid"] = _vit_grid(h, w, p.vit_side, f)
    target = kw.get("target_grid")
    kw["vae_rows"] = (2 if source else 1) * (target[0] * target[1] * target[2]) if target else 0
    prefix = []
    for s in splits:  # substitute the real block sizes
        kind = BLOCK_MODES.get(s.mode)
        if kind == "vit":
            t, gh, gw = kw["vit_grid"]
            s = Split(t * gh * gw // 4 + 2, s.mode)
        elif kind == "source":
            n = source[0] * source[1] * source[2]
            s = Split(n + 2, s.mode, gen_rows=n)
        prefix.append(s)
    return Workload(prefix=tuple(prefix), notes=tuple(notes), **kw)
