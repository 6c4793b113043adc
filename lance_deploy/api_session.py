"""`EditSession`: multi-turn image or video editing where each turn edits an earlier turn's output.

    from lance_deploy.api import EditSession, load_pipeline
    pipe = load_pipeline("~/Lance", task="image_edit")
    s = EditSession.create("sessions/boat", read_image("boat.png"))
    s.edit(pipe, "add snow")                 # turn 1 edits the source
    s.edit(pipe, "make it night")            # turn 2 edits turn 1
    s.edit(pipe, "paint it red", parent=1)   # turn 3 branches from turn 1
    assert s.verify(pipe, 2)                 # a replay gives the same pixels, bit for bit

    frames, fps = read_video("waves.mp4")    # a video session runs video_edit the same way
    v = EditSession.create("sessions/waves", video=frames, fps=fps)

The folder holds `session.json` (the task; each turn's parent, prompt, seed, sampler options and,
for a video, frame rate) and one lossless file per turn (turn_000 is the source): a PNG for an
image session; for a video session a uint8 [N, H, W, 3] `.npy` (read with allow_pickle=False) plus
an MP4 of it to watch. Every file is written atomically and never rewritten, so a turn's input (its
parent's PNG / .npy) is exactly the array the parent produced.
A front end that runs the pipeline itself (a server queue, `run --continue`) uses `request` (or
`edit_request`) and `record` instead of `edit`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.fsutil import atomic_path

SESSION_FILE = "session.json"
FORMAT = 2  # 2 added video sessions ("task", Turn.view, Turn.fps); format 1 (images only) still opens
READABLE_FORMATS = (1, 2)
# the task of a session -> the suffix of its lossless turn files
TURN_SUFFIX = {"image_edit": ".png", "video_edit": ".npy"}
EDIT_TASKS = tuple(TURN_SUFFIX)
# TaskRequest fields that decide an output (with the sampler's); what a replay needs besides the media.
REQUEST_FIELDS = ("task", "prompt", "negative_prompt", "question", "system", "height", "width", "frames", "seed",
                  "preset", "vae_area_side", "vit_area_side", "max_new_tokens", "video_fps")
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


def edit_request(task: str, prompt: str, *, image=None, video=None, fps: float | None = None, seed: int = 42,
                 steps: int = 30, shift: float = 3.5, cfg: float = 4.0, **options):
    """The TaskRequest of one turn: `image` for image_edit, `video` at `fps` for video_edit (options:
    preset, vae_area_side, vit_area_side)."""
    from lance_deploy.pipeline.sampler import SamplerConfig
    from lance_deploy.pipeline.tasks import TaskRequest

    return TaskRequest(task=task, prompt=prompt, image=image, video=video, video_fps=fps, seed=seed,
                       sampler=SamplerConfig(steps=steps, shift=shift, cfg_scale=cfg), **options)


def write_png(frame: np.ndarray, path, text: dict[str, str] | None = None) -> None:
    """A uint8 [H, W, 3] frame as a PNG with tEXt chunks, atomically (the parameters travel with the image)."""
    from lance_deploy.media.io import write_image

    write_image(frame, path, text)


def read_png(path) -> np.ndarray:
    from lance_deploy.media.io import read_image

    return read_image(path)


def write_frames(frames: np.ndarray, path) -> None:
    """uint8 [N, H, W, 3] frames as a plain .npy (no pickle), atomically: the lossless copy of a video turn."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(frames), allow_pickle=False)


def read_frames(path) -> np.ndarray:
    """The frames `write_frames` wrote; anything else is a one-line error naming the file."""
    try:
        frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise LanceUsageError(f"{path}: not a readable .npy frame array ({e})") from None
    return _check_video(frames, str(path))


@dataclass(frozen=True)
class Turn:
    """One image or video of the session: turn 0 is the source, every later one an edit of `parent`."""

    index: int
    parent: int | None
    prompt: str | None
    seed: int | None
    params: dict  # request_params of the edit ({} for the source)
    output: str  # the lossless file in the session folder (.png / .npy)
    created: float = field(default_factory=time.time)
    view: str | None = None  # the MP4 of a video turn, to watch (None for an image: the PNG is both)
    fps: float | None = None  # a video turn's frame rate (the source's, then the model's 12)

    @property
    def input(self) -> str | None:
        return None if self.parent is None else turn_file(self.parent, Path(self.output).suffix)


def turn_file(index: int, suffix: str = ".png") -> str:
    return f"turn_{index:03d}{suffix}"


class EditSession:
    """A session folder; methods are safe to call from several threads (one lock per object)."""

    def __init__(self, folder: Path, turns: list[Turn], task: str = "image_edit"):
        self.folder, self.turns, self.task = Path(folder), turns, task
        self._lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, folder, image: np.ndarray | None = None, *, video: np.ndarray | None = None,
               fps: float | None = None) -> EditSession:
        """Start a session in a new or empty `folder` with turn 0 = `image` (uint8 [H, W, 3]; an
        image_edit session) or `video` (uint8 [N, H, W, 3] at `fps`; a video_edit session)."""
        folder = Path(folder)
        if (image is None) == (video is None):
            raise LanceUsageError("EditSession.create: give the source image, or video= with its fps=")
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise LanceUsageError(f"{folder}: not empty; open an existing session with EditSession.open")
        if video is None:
            session, media = cls(folder, [], "image_edit"), _check_frame(image)
        else:
            session, media, fps = cls(folder, [], "video_edit"), _check_video(video), _check_fps(fps)
        folder.mkdir(parents=True, exist_ok=True)
        session.turns.append(session._write(Turn(index=0, parent=None, prompt=None, seed=None, params={},
                                                 output=""), media, fps))
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
            task = data.get("task", "image_edit")  # format 1 held images only
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LanceUsageError(f"{path}: unreadable session file ({e})") from None
        if data.get("format") not in READABLE_FORMATS or not turns:
            raise LanceUsageError(f"{path}: unsupported session format {data.get('format')!r}")
        if task not in EDIT_TASKS:
            raise LanceUsageError(f"{path}: unknown session task {task!r}; expected one of {', '.join(EDIT_TASKS)}")
        for t in turns:
            for name in (t.output, t.view):
                if name is not None and not (folder / name).is_file():
                    raise LanceUsageError(f"{folder}: turn {t.index}'s file {name} is missing")
        return cls(folder, turns, task)

    # -- reading ----------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return self.task == "video_edit"

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
        """The lossless file of a turn (PNG / .npy)."""
        return self.folder / self.turn(index).output

    def view_path(self, index: int | None = None) -> Path:
        """What to show or download for a turn: its PNG, or its MP4."""
        t = self.turn(index)
        return self.folder / (t.view or t.output)

    def media(self, index: int | None = None) -> np.ndarray:
        """A turn's exact pixels: uint8 [H, W, 3] (image) or [N, H, W, 3] (video)."""
        return read_frames(self.path(index)) if self.is_video else read_png(self.path(index))

    def image(self, index: int | None = None) -> np.ndarray:
        if self.is_video:
            raise LanceUsageError(f"{self.folder}: a video session; its turns are videos (EditSession.video)")
        return self.media(index)

    def video(self, index: int | None = None) -> tuple[np.ndarray, float]:
        """(frames, fps) of a turn of a video session."""
        if not self.is_video:
            raise LanceUsageError(f"{self.folder}: an image session; its turns are images (EditSession.image)")
        return self.media(index), self.turn(index).fps

    def input_image(self, parent: int | None = None) -> np.ndarray:
        """What the next image edit takes as input: the output of `parent` (default: the last turn)."""
        return self.image(parent)

    def input_video(self, parent: int | None = None) -> tuple[np.ndarray, float]:
        """What the next video edit takes as input: (frames, fps) of `parent` (default: the last turn)."""
        return self.video(parent)

    # -- editing ----------------------------------------------------------------------------
    def request(self, prompt: str, *, parent: int | None = None, **opts):
        """The TaskRequest of a new turn on `parent`'s output (opts: seed, steps, shift, cfg, preset,
        vae_area_side, vit_area_side; see `edit_request`)."""
        return edit_request(self.task, prompt, **self._inputs(self.turn(parent).index), **opts)

    def record(self, req, output: np.ndarray, *, parent: int | None = None, meta: dict | None = None) -> Turn:
        """Append the `output` of `req` (made by `request(..., parent=parent)`) as a new turn: a frame
        for an image session, all frames for a video session. `meta`: the pipeline output's parameters
        (`GenerationOutput.meta`), which the turn's files carry; without it, those of `req` alone."""
        output = _check_video(output) if self.is_video else _check_frame(output)
        with self._lock:
            base = self.turn(parent)
            if req.task != self.task:
                raise LanceUsageError(f"{self.folder} holds {self.task} turns; a {req.task} request cannot extend it")
            if not self._is_input(req, base):
                raise LanceUsageError(f"the request's {'video' if self.is_video else 'image'} is not turn "
                                      f"{base.index}'s output; build it with EditSession.request(..., "
                                      f"parent={base.index})")
            params = request_params(req)
            turn = Turn(index=len(self.turns), parent=base.index, prompt=req.prompt, seed=req.seed, params=params,
                        output="")
            turn = self._write(turn, output, self._output_fps(), meta or _request_meta(req, output))
            self.turns.append(turn)
            self._save()
        return turn

    def edit(self, pipe, prompt: str, *, parent: int | None = None, progress: bool = False, **opts) -> Turn:
        """Run one edit with `pipe` (a pipeline loaded for the session's task) and record it."""
        req = self.request(prompt, parent=parent, **opts)
        result = pipe(req, progress=progress)
        return self.record(req, self._output(result), parent=parent, meta=result.meta)

    # -- replay -----------------------------------------------------------------------------
    def replay_request(self, index: int):
        turn = self.turn(index)
        if turn.parent is None:
            raise LanceUsageError("turn 0 is the source; there is nothing to replay")
        inputs = self._inputs(turn.parent)
        inputs.pop("fps", None)  # the recorded params hold video_fps
        return request_from_params(turn.params, **inputs)

    def replay(self, pipe, index: int, *, progress: bool = False) -> np.ndarray:
        """Run turn `index` again from its stored input and parameters; returns its frame (or frames)."""
        return self._output(pipe(self.replay_request(index), progress=progress))

    def verify(self, pipe, index: int) -> bool:
        """Whether a replay of turn `index` reproduces its stored pixels exactly."""
        return bool(np.array_equal(self.replay(pipe, index), self.media(index)))

    # -- internals ----------------------------------------------------------------------------
    def _inputs(self, index: int) -> dict:
        if self.is_video:
            frames, fps = self.video(index)
            return {"video": frames, "fps": fps}
        return {"image": self.image(index)}

    def _is_input(self, req, base: Turn) -> bool:
        media = req.video if self.is_video else req.image
        if media is None or not np.array_equal(np.asarray(media), self.media(base.index)):
            return False
        return not self.is_video or req.video_fps == base.fps

    def _output(self, result) -> np.ndarray:
        return result.frames if self.is_video else result.frames[0]

    def _output_fps(self) -> float | None:
        from lance_deploy.media.preprocess import TARGET_FPS

        return float(TARGET_FPS) if self.is_video else None  # the model's videos come at its sampling rate

    def _write(self, turn: Turn, media: np.ndarray, fps: float | None, meta: dict | None = None) -> Turn:
        """Write a turn's files (the lossless one, then an MP4 to watch) and fill in their names; an
        edit's files carry its parameters `meta` (`media.metadata`: the format `run` writes)."""
        from lance_deploy.media.metadata import dumps, png_text

        output = turn_file(turn.index, TURN_SUFFIX[self.task])
        if not self.is_video:
            write_png(media, self.folder / output, {"lance_session_turn": str(turn.index),
                                                    **(png_text(meta) if meta else {})})
            return Turn(**{**asdict(turn), "output": output})
        from lance_deploy.media.io import write_video

        write_frames(media, self.folder / output)
        view = turn_file(turn.index, ".mp4")
        write_video(media, self.folder / view, fps=fps, comment=dumps(meta) if meta else None)
        return Turn(**{**asdict(turn), "output": output, "view": view, "fps": fps})

    def _save(self) -> None:
        data = {"format": FORMAT, "task": self.task, "turns": [asdict(t) for t in self.turns]}
        with atomic_path(self.folder / SESSION_FILE) as tmp:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _request_meta(req, output: np.ndarray) -> dict:
    """The parameters of a turn recorded without its pipeline output (no model or backend known)."""
    from lance_deploy.pipeline.provenance import LoadInfo, output_metadata

    shape = output.shape[:3] if output.ndim == 4 else (1, *output.shape[:2])
    return output_metadata(req, LoadInfo(), backend=None, dtype=None, device=None, frames=shape[0],
                           height=shape[1], width=shape[2])


def _check_frame(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 4 and frame.shape[0] == 1:
        frame = frame[0]
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
        raise LanceUsageError(f"an edit session holds uint8 [H, W, 3] images, got {frame.dtype} {list(frame.shape)}")
    return frame


def _check_video(frames, what: str = "a video edit session") -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or 0 in frames.shape:
        raise LanceUsageError(f"{what}: expected uint8 [N, H, W, 3] video frames, got {frames.dtype} "
                              f"{list(frames.shape)}")
    return frames


def _check_fps(fps) -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 1000):
        raise LanceUsageError(f"a video session needs the source's frame rate: fps in (0, 1000], got {fps!r}")
    return value
