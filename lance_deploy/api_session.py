"""`EditSession`: multi-turn image editing where each turn edits an earlier turn's output.

    from lance_deploy.api import EditSession, load_pipeline
    pipe = load_pipeline("~/Lance", task="image_edit")
    s = EditSession.create("sessions/boat", read_image("boat.png"))
    s.edit(pipe, "add snow")                 # turn 1 edits the source
    s.edit(pipe, "make it night")            # turn 2 edits turn 1
    s.edit(pipe, "paint it red", parent=1)   # turn 3 branches from turn 1
    assert s.verify(pipe, 2)                 # a replay gives the same pixels, bit for bit

The folder holds one lossless PNG per turn (turn_000.png is the source) and `session.json`: each
turn's parent, prompt, seed and sampler options. Every file is written atomically and never
rewritten, so a turn's input (its parent's PNG) is exactly the array the parent produced.
A front end that runs the pipeline itself (a server queue, `run --continue`) uses `input_image`,
`request` and `record` instead of `edit`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.fsutil import atomic_path

SESSION_FILE = "session.json"
FORMAT = 1
# TaskRequest fields that decide an output (with the sampler's); what a replay needs besides the media.
REQUEST_FIELDS = ("task", "prompt", "question", "system", "height", "width", "frames", "seed", "preset",
                  "vae_area_side", "vit_area_side", "max_new_tokens", "video_fps")
SAMPLER_FIELDS = ("steps", "shift", "cfg_scale", "cfg_interval", "renorm_min")


def request_params(req) -> dict:
    """The JSON-able options of a `TaskRequest` (media excluded): stored beside every result."""
    out = {k: getattr(req, k) for k in REQUEST_FIELDS}
    out["sampler"] = {k: getattr(req.sampler, k) for k in SAMPLER_FIELDS}
    out["sampler"]["cfg_interval"] = list(out["sampler"]["cfg_interval"])
    return out


def request_from_params(params: dict, *, image=None, video=None):
    """The inverse of `request_params`: the same request, given the same media."""
    from lance_deploy.pipeline.sampler import SamplerConfig
    from lance_deploy.pipeline.tasks import TaskRequest

    s = dict(params["sampler"])
    s["cfg_interval"] = tuple(s["cfg_interval"])
    return TaskRequest(**{k: params.get(k) for k in REQUEST_FIELDS}, sampler=SamplerConfig(**s), image=image,
                       video=video)


def write_png(frame: np.ndarray, path, text: dict[str, str] | None = None) -> None:
    """A uint8 [H, W, 3] frame as a PNG with tEXt chunks, atomically (the parameters travel with the image)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(frame)).save(tmp, format="PNG", pnginfo=info)


def read_png(path) -> np.ndarray:
    from lance_deploy.media.io import read_image

    return read_image(path)


@dataclass(frozen=True)
class Turn:
    """One image of the session: turn 0 is the source, every later one an edit of `parent`."""

    index: int
    parent: int | None
    prompt: str | None
    seed: int | None
    params: dict  # request_params of the edit ({} for the source)
    output: str  # file name in the session folder
    created: float = field(default_factory=time.time)

    @property
    def input(self) -> str | None:
        return None if self.parent is None else turn_file(self.parent)


def turn_file(index: int) -> str:
    return f"turn_{index:03d}.png"


class EditSession:
    """A session folder; methods are safe to call from several threads (one lock per object)."""

    def __init__(self, folder: Path, turns: list[Turn]):
        self.folder, self.turns = Path(folder), turns
        self._lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, folder, image: np.ndarray) -> EditSession:
        """Start a session in a new or empty `folder` with `image` (uint8 [H, W, 3]) as turn 0."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise LanceUsageError(f"{folder}: not empty; open an existing session with EditSession.open")
        folder.mkdir(parents=True, exist_ok=True)
        image = _check_frame(image)
        write_png(image, folder / turn_file(0), {"lance_session_turn": "0"})
        session = cls(folder, [Turn(index=0, parent=None, prompt=None, seed=None, params={}, output=turn_file(0))])
        session._save()
        return session

    @classmethod
    def open(cls, folder) -> EditSession:
        folder = Path(folder)
        path = folder / SESSION_FILE
        if not path.is_file():
            raise LanceUsageError(f"{folder}: not an edit session (no {SESSION_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            turns = [Turn(**t) for t in data["turns"]]
        except (ValueError, KeyError, TypeError) as e:
            raise LanceUsageError(f"{path}: unreadable session file ({e})") from None
        if data.get("format") != FORMAT or not turns:
            raise LanceUsageError(f"{path}: unsupported session format {data.get('format')!r}")
        for t in turns:
            if not (folder / t.output).is_file():
                raise LanceUsageError(f"{folder}: turn {t.index}'s image {t.output} is missing")
        return cls(folder, turns)

    # -- reading ----------------------------------------------------------------------------
    @property
    def last(self) -> Turn:
        return self.turns[-1]

    def turn(self, index: int | None = None) -> Turn:
        if index is None:
            return self.last
        if not 0 <= index < len(self.turns):
            raise LanceUsageError(f"turn {index}: this session has turns 0..{len(self.turns) - 1}")
        return self.turns[index]

    def path(self, index: int | None = None) -> Path:
        return self.folder / self.turn(index).output

    def image(self, index: int | None = None) -> np.ndarray:
        return read_png(self.path(index))

    def input_image(self, parent: int | None = None) -> np.ndarray:
        """What the next edit takes as input: the output of `parent` (default: the last turn)."""
        return self.image(parent)

    # -- editing ----------------------------------------------------------------------------
    def request(self, prompt: str, *, parent: int | None = None, seed: int = 42, steps: int = 30,
                shift: float = 3.5, cfg: float = 4.0, **options):
        """The `image_edit` TaskRequest of a new turn on `parent`'s output (options: preset,
        vae_area_side, vit_area_side)."""
        from lance_deploy.pipeline.sampler import SamplerConfig
        from lance_deploy.pipeline.tasks import TaskRequest

        return TaskRequest(task="image_edit", prompt=prompt, image=self.input_image(parent), seed=seed,
                           sampler=SamplerConfig(steps=steps, shift=shift, cfg_scale=cfg), **options)

    def record(self, req, frame: np.ndarray, *, parent: int | None = None) -> Turn:
        """Append the output `frame` of `req` (made by `request(..., parent=parent)`) as a new turn."""
        frame = _check_frame(frame)
        with self._lock:
            base = self.turn(parent)
            if req.image is None or not np.array_equal(np.asarray(req.image), self.image(base.index)):
                raise LanceUsageError(f"the request's image is not turn {base.index}'s output; build it with "
                                      f"EditSession.request(..., parent={base.index})")
            index = len(self.turns)
            params = request_params(req)
            write_png(frame, self.folder / turn_file(index),
                      {"lance_session_turn": str(index), "lance": json.dumps(params)})
            turn = Turn(index=index, parent=base.index, prompt=req.prompt, seed=req.seed, params=params,
                        output=turn_file(index))
            self.turns.append(turn)
            self._save()
        return turn

    def edit(self, pipe, prompt: str, *, parent: int | None = None, progress: bool = False, **opts) -> Turn:
        """Run one edit with `pipe` (a pipeline loaded for image_edit) and record it."""
        req = self.request(prompt, parent=parent, **opts)
        return self.record(req, pipe(req, progress=progress).frames[0], parent=parent)

    # -- replay -----------------------------------------------------------------------------
    def replay_request(self, index: int):
        turn = self.turn(index)
        if turn.parent is None:
            raise LanceUsageError("turn 0 is the source image; there is nothing to replay")
        return request_from_params(turn.params, image=self.image(turn.parent))

    def replay(self, pipe, index: int, *, progress: bool = False) -> np.ndarray:
        """Run turn `index` again from its stored input and parameters; returns the frame."""
        return pipe(self.replay_request(index), progress=progress).frames[0]

    def verify(self, pipe, index: int) -> bool:
        """Whether a replay of turn `index` reproduces its stored pixels exactly."""
        return bool(np.array_equal(self.replay(pipe, index), self.image(index)))

    def _save(self) -> None:
        data = {"format": FORMAT, "turns": [asdict(t) for t in self.turns]}
        with atomic_path(self.folder / SESSION_FILE) as tmp:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _check_frame(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 4 and frame.shape[0] == 1:
        frame = frame[0]
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
        raise LanceUsageError(f"an edit session holds uint8 [H, W, 3] images, got {frame.dtype} {list(frame.shape)}")
    return frame
