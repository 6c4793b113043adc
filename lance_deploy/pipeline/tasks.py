"""The seven Lance tasks: what each needs, its defaults, and request validation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.tasks import (  # noqa: F401  (re-exported: the vocabulary)
    GENERATION_TASKS,
    OUTPUT_FRAME_TASKS,
    TASKS,
    UNDERSTANDING_TASKS,
    VIDEO_TASKS,
)
from lance_deploy.pipeline.sampler import SamplerConfig

MAX_FRAMES = 121  # upstream max_num_frames: 31 latent frames
SPATIAL_STRIDE = 16  # VAE 16x spatial compression
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

    def validate(self) -> "TaskRequest":
        """Check options and fill defaults; raises LanceUsageError naming the option."""
        if self.task not in SPECS:
            raise LanceUsageError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        spec = self.spec
        if self.task in UNDERSTANDING_TASKS:
            if not self.question:
                raise LanceUsageError(f"{self.task} needs --question TEXT")
            self.system = self.system or DEFAULT_SYSTEM[self.task]
            if self.max_new_tokens < 1:
                raise LanceUsageError("--max-new-tokens must be at least 1")
        elif not self.prompt:
            raise LanceUsageError(f"{self.task} needs --prompt TEXT")
        if spec.media == "image" and self.image is None:
            raise LanceUsageError(f"{self.task} needs --image FILE")
        if spec.media == "video" and self.video is None:
            raise LanceUsageError(f"{self.task} needs --video PATH")
        self.preset = self.preset or DEFAULT_PRESET[self.task]
        self._validate_sampler()
        if self.task in ("t2i", "t2v"):
            self._validate_size()
        if self.task in OUTPUT_FRAME_TASKS:
            self._validate_frames()
        return self

    def _validate_sampler(self) -> None:
        s = self.sampler
        if s.steps < 1:
            raise LanceUsageError(f"--steps must be at least 1, got {s.steps}")
        if s.shift <= 0:
            raise LanceUsageError(f"--shift must be positive, got {s.shift}")
        if s.cfg_scale < 0:
            raise LanceUsageError(f"--cfg must be >= 0, got {s.cfg_scale}")

    def _validate_size(self) -> None:
        default = (768, 768) if self.task == "t2i" else (480, 848)
        self.height = self.height or default[0]
        self.width = self.width or default[1]
        for name, v in (("--height", self.height), ("--width", self.width)):
            if v <= 0 or v % SPATIAL_STRIDE:
                raise LanceUsageError(f"{name} {v} is not a positive multiple of {SPATIAL_STRIDE}")

    def _validate_frames(self) -> None:
        if self.frames is None:
            self.frames = 121 if self.task == "t2v" else 61
        if self.frames < 1 or self.frames > MAX_FRAMES:
            raise LanceUsageError(f"--frames {self.frames} is outside 1..{MAX_FRAMES} (the model's limit)")
        real = (self.frames - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1
        if real != self.frames:
            self.notes.append(f"--frames {self.frames} is not 4k+1; generating {real} frames, as upstream does")
            self.frames = real


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Pixel size -> latent (t, h, w)."""
    return (frames - 1) // TEMPORAL_STRIDE + 1, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE
