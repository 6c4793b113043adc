"""The one resident model of a server process: which tasks it serves, and running a request on it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.tasks import TASKS, VIDEO_TASKS

IMAGE_TASKS = tuple(t for t in TASKS if t not in VIDEO_TASKS)


def model_variant(path: Path, variant: str | None) -> tuple[Path, str]:
    """(the model folder to load, 'image' | 'video'). A download folder serves its video model by default:
    it runs all seven tasks, the image model only t2i, image_edit and x2t_image."""
    from lance_deploy.artifact.load import is_artifact
    from lance_deploy.checkpoint.layout import MODEL_DIRS, discover, is_download_folder

    if is_artifact(path):
        from lance_deploy.artifact.reader import ArtifactReader

        found = ArtifactReader(path).manifest.source.get("variant", "image")
        if variant not in (None, found):
            raise LanceUsageError(f"--variant {variant}: the artifact {path} holds the {found} model")
        return path, found
    if Path(path).is_dir() and is_download_folder(Path(path)):
        if variant is None:
            variant = "video" if (Path(path) / MODEL_DIRS["video"]).is_dir() else "image"
        return discover(path, variant=variant).model_dir, variant
    layout = discover(path, variant=variant)
    return layout.model_dir, layout.variant


@dataclass
class Engine:
    """A pipeline loaded for every task its model runs; `run` is called from one worker thread."""

    pipe: object  # pipeline.pipeline.LancePipeline
    tasks: tuple[str, ...]
    variant: str
    model_id: str
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, model, *, variant: str | None = None, gpu_memory=None, device=None, dtype=None) -> Engine:
        from lance_deploy.api import load_pipeline
        from lance_deploy.core.units import parse_size
        from lance_deploy.pipeline.tasks import TaskRequest

        folder, variant = model_variant(Path(model).expanduser(), variant)
        # the heaviest default request first: a --gpu-memory plan is made for it
        tasks = ("t2v",) + tuple(t for t in TASKS if t != "t2v") if variant == "video" else IMAGE_TASKS
        budget = parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
        pipe = load_pipeline(folder, tasks, gpu_memory=budget, device=device, dtype=dtype,
                             request=TaskRequest(task=tasks[0]))
        return cls(pipe=pipe, tasks=tasks, variant=variant,
                   model_id="lance-3b-video" if variant == "video" else "lance-3b")

    @property
    def tokenizer(self):
        return self.pipe.c.tokenizer

    def validate(self, req) -> None:
        """The pipeline's own checks (limits, sizes, frames, token caps), before the job is queued."""
        check_task(req.task, self.tasks, self.variant)
        req.validate(tokenizer=self.tokenizer)

    def run(self, req, *, on_step=None, on_token=None):
        with self._lock:  # one request at a time on the resident model
            return self.pipe(req, progress=False, on_step=on_step, on_token=on_token)


def check_task(task: str, tasks, variant: str) -> None:
    if task not in tasks:
        need = "the video model (Lance_3B_Video)" if task in VIDEO_TASKS else "another model"
        raise LanceUsageError(f"task {task} needs {need}; this server holds the {variant} model "
                              f"and serves {', '.join(sorted(tasks))}")


class TextStream:
    """Decoded text of an x2t answer as it grows, one token at a time (for streaming).

    Byte-level BPE can split a character across tokens, so a delta is held back while the text
    ends in U+FFFD; `finish` returns whatever the final decode adds."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        if token_id == self.tok.im_end:
            return ""
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, final: str) -> str:
        if not final.startswith(self.sent):
            return ""  # the final decode is not an extension of what was sent; the result carries it whole
        delta, self.sent = final[len(self.sent):], final
        return delta
