"""The seven Lance tasks: what each needs, its defaults, and request validation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.tasks import (  # re-exported: the vocabulary
    GENERATION_TASKS,
    OUTPUT_FRAME_TASKS,
    TASKS,
    UNDERSTANDING_TASKS,
    VIDEO_TASKS,
)
from lance_deploy.media.io import check_pixels
from lance_deploy.media.preprocess import (
    PRESETS,
    VAE_CROP,
    VIT_CROP,
    bucket_sizes,
    sample_frame_indices,
)
from lance_deploy.pipeline import limits
from lance_deploy.pipeline.limits import SPATIAL_STRIDE
from lance_deploy.pipeline.sampler import SamplerConfig

MAX_FRAMES = 121  # upstream max_num_frames: 31 latent frames
TEMPORAL_STRIDE = 4

DEFAULT_SYSTEM = {
    "x2t_image": "Look at the image carefully and answer the question.",
    "x2t_video": "Watch the video carefully and answer the question.",
}
DEFAULT_PRESET = {t: ("video_480p" if t in VIDEO_TASKS else "image_768res") for t in TASKS}


@dataclass(frozen=True)
class TaskSpec:
    """Which components a task loads."""

    gen: bool  # generation expert, time embedder, bridges
    lm_head: bool
    vit: bool
    vae_encoder: bool
    vae_decoder: bool
    media: str | None  # 'image', 'video' or None


SPECS = {
    "t2i": TaskSpec(gen=True, lm_head=False, vit=False, vae_encoder=False, vae_decoder=True, media=None),
    "t2v": TaskSpec(gen=True, lm_head=False, vit=False, vae_encoder=False, vae_decoder=True, media=None),
    "i2v": TaskSpec(gen=True, lm_head=False, vit=False, vae_encoder=True, vae_decoder=True, media="image"),
    "image_edit": TaskSpec(gen=True, lm_head=False, vit=True, vae_encoder=True, vae_decoder=True, media="image"),
    "video_edit": TaskSpec(gen=True, lm_head=False, vit=True, vae_encoder=True, vae_decoder=True, media="video"),
    "x2t_image": TaskSpec(gen=False, lm_head=True, vit=True, vae_encoder=False, vae_decoder=False, media="image"),
    "x2t_video": TaskSpec(gen=False, lm_head=True, vit=True, vae_encoder=False, vae_decoder=False, media="video"),
}


def union_spec(tasks) -> TaskSpec:
    """The components that serve every task in `tasks` (one load for several tasks)."""
    specs = [SPECS[t] for t in tasks]
    return TaskSpec(gen=any(x.gen for x in specs), lm_head=any(x.lm_head for x in specs),
                    vit=any(x.vit for x in specs), vae_encoder=any(x.vae_encoder for x in specs),
                    vae_decoder=any(x.vae_decoder for x in specs), media=None)


def covers(loaded: TaskSpec, task: str) -> bool:
    """Whether components loaded for `loaded` can run `task`."""
    need = SPECS[task]
    return all(getattr(loaded, f) or not getattr(need, f) for f in ("gen", "lm_head", "vit", "vae_encoder",
                                                                      "vae_decoder"))


@dataclass
class TaskRequest:
    """One `run`: inputs and options, with upstream's defaults."""

    task: str
    prompt: str | None = None  # caption (t2i/t2v/i2v) or instruction (edits)
    negative_prompt: str | None = None  # text-CFG's unconditional caption (None / "": upstream's, none)
    question: str | None = None  # x2t
    system: str | None = None  # x2t system prompt
    image: np.ndarray | None = None  # uint8 [H, W, 3]
    video: np.ndarray | None = None  # uint8 [N, H, W, 3]
    video_fps: float | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 42
    preset: str | None = None
    vae_area_side: int | None = None
    vit_area_side: int | None = None
    init_noise: object = None  # torch.Tensor [n_vae_tokens, 48] or None
    max_new_tokens: int = 256
    notes: list[str] = field(default_factory=list)  # adjustments reported to the user

    @property
    def spec(self) -> TaskSpec:
        return SPECS[self.task]

    def validate(self, *, media: bool = True, tokenizer=None) -> "TaskRequest":
        """Check every option against what the model supports and fill defaults; raises one-line
        LanceUsageErrors naming the option. Cheap and idempotent: the CLI calls it before loading
        anything, first with `media=False` (before decoding the files), then in full.
        `tokenizer`, when given, also caps the texts in tokens."""
        if self.task not in SPECS:
            raise LanceUsageError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        self._validate_texts(tokenizer)
        self._validate_sampler()
        if self.negative_prompt and self.sampler.cfg_scale <= 1.0:
            note = "--negative-prompt has no effect with --cfg 1 or less (text CFG is off)"
            if note not in self.notes:
                self.notes.append(note)
        self.max_new_tokens = limits.integer("--max-new-tokens", self.max_new_tokens, 1, limits.MAX_NEW_TOKENS)
        self._validate_buckets()
        if self.task in ("t2i", "t2v"):
            self._validate_size()
        if self.task in OUTPUT_FRAME_TASKS:
            self._validate_frames()
        if media:
            self._validate_media()
        return self

    def _validate_texts(self, tokenizer) -> None:
        if self.task in UNDERSTANDING_TASKS:
            if not self.question:
                raise LanceUsageError(f"{self.task} needs --question TEXT")
            self.system = self.system or DEFAULT_SYSTEM[self.task]
        elif not self.prompt:
            raise LanceUsageError(f"{self.task} needs --prompt TEXT")
        if self.negative_prompt and self.task in UNDERSTANDING_TASKS:
            raise LanceUsageError(f"--negative-prompt: {self.task} has no CFG branch; drop it")
        texts = (("--prompt", self.prompt), ("--negative-prompt", self.negative_prompt), ("--question", self.question),
                 ("--system", self.system))
        for option, value in texts:
            limits.text(option, value)
        if tokenizer is not None:
            for option, value in texts:
                limits.tokens(option, value, tokenizer)

    def _validate_sampler(self) -> None:
        s = self.sampler
        limits.integer("--steps", s.steps, 1, limits.MAX_STEPS, "a step count")
        limits.real("--shift", s.shift, 0.0, limits.MAX_SHIFT, lo_open=True)
        limits.real("--cfg", s.cfg_scale, 0.0, limits.MAX_CFG)
        self.seed = limits.integer("--seed", self.seed, 0, limits.MAX_SEED, "a seed")

    def _validate_buckets(self) -> None:
        self.preset = self.preset or DEFAULT_PRESET[self.task]
        if self.preset not in PRESETS:
            raise LanceUsageError(f"--resolution {self.preset!r}: expected one of {', '.join(PRESETS)}")
        if self.vae_area_side is not None:
            self.vae_area_side = limits.bucket_side("--vae-area-side", self.vae_area_side, VAE_CROP, bucket_sizes)
        if self.vit_area_side is not None:
            self.vit_area_side = limits.bucket_side("--vit-area-side", self.vit_area_side, VIT_CROP, bucket_sizes)

    def _validate_size(self) -> None:
        default = (768, 768) if self.task == "t2i" else (480, 848)
        self.height = limits.size("--height", self.height, default[0])
        self.width = limits.size("--width", self.width, default[1])
        limits.area(self.height, self.width)
        if max(self.height, self.width) > limits.TABLE_SIDE:
            note = (f"{self.height}x{self.width}: sides over {limits.TABLE_SIDE} px pass the model's latent position "
                    "table; positions wrap as upstream's do, expect artefacts")
            if note not in self.notes:
                self.notes.append(note)

    def _validate_media(self) -> None:
        spec = self.spec
        if spec.media == "image" and self.image is None:
            raise LanceUsageError(f"{self.task} needs --image FILE")
        if spec.media == "video" and self.video is None:
            raise LanceUsageError(f"{self.task} needs --video PATH")
        if spec.media == "video" and self.video_fps is None:
            raise LanceUsageError(f"{self.task}: the --video frame rate is unknown; pass it with --fps")
        for option, frames in (("--image", self.image), ("--video", self.video)):
            if frames is not None and np.ndim(frames) >= 3:  # arrays handed in through the API meet the file caps
                check_pixels(frames.shape[-2], frames.shape[-3], option)
        if self.task == "video_edit":
            kept = len(sample_frame_indices(len(self.video), self.video_fps))
            if kept < 1 + TEMPORAL_STRIDE:  # one latent frame: the "video" would come out as a still
                what = ("a single frame (a still image)" if len(self.video) == 1 else
                        f"{len(self.video)} frames, {kept} after 12 fps sampling (at least {1 + TEMPORAL_STRIDE}, "
                        "~0.4 s, are needed)")
                raise LanceUsageError(f"video_edit edits a video (upstream's video_edit reads a clip), but --video "
                                      f"has {what}; for a still image use image_edit --image FILE")

    def _validate_frames(self) -> None:
        if self.frames is None:
            self.frames = 121 if self.task == "t2v" else 61
        self.frames = limits.integer("--frames", self.frames, 1, MAX_FRAMES, "a frame count (the model's limit)")
        real = (self.frames - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1
        if real != self.frames:
            self.notes.append(f"--frames {self.frames} is not 4k+1; generating {real} frames, as upstream does")
            self.frames = real


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Pixel size -> latent (t, h, w)."""
    return (frames - 1) // TEMPORAL_STRIDE + 1, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE
