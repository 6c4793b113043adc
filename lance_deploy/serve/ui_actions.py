"""What the web UI's buttons do: build a request, put it on the server's queue, follow its events.

The UI shares the API's scheduler, so its jobs wait in the same bounded queue (a full queue is
an error toast, not a hang) and show the same step / token progress.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from lance_deploy.api_session import EditSession, request_params
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.serve.inputs import usage_message
from lance_deploy.serve.jobs import SUCCEEDED, Event, Job
from lance_deploy.serve.scheduler import QueueFull
from lance_deploy.serve.store import KEEP_FRAMES


def status_line(job: Job, e: Event) -> str:
    if e.type == "queued":
        return f"queued (position {e.data.get('position', '?')})"
    if e.type == "started":
        return "running"
    if e.type in ("step", "token"):
        return f"{job.task}: {'step' if e.type == 'step' else 'token'} {e.data['step']}/{e.data['total']}"
    if e.type == SUCCEEDED:
        return f"done: {job.task} in {job.finished - job.created:.1f} s (seed {job.request.seed})"
    return f"{e.type}: {job.error}"


class UIError(Exception):
    """Shown to the user as an error toast (the UI module turns it into gr.Error)."""


def _side(value) -> int | None:
    return int(value) if value else None  # 0 / empty = the preset's default


def _negative(text) -> str | None:
    return text.strip() or None if text else None  # empty = upstream's uncond branch (the caption removed)


class Actions:
    def __init__(self, scheduler, out: Path):
        self.s, self.sessions = scheduler, Path(out) / "sessions"

    def sampler(self, steps, cfg) -> SamplerConfig:
        return SamplerConfig(steps=int(steps), cfg_scale=float(cfg))

    async def follow(self, req: TaskRequest, *, keep_frames: bool = False):
        """Queue `req`; yield (status line, job, event) for each of its events, the terminal one last.
        `keep_frames`: store a video's exact frames too (a video edit session's next input)."""
        params = {**request_params(req), **({KEEP_FRAMES: True} if keep_frames else {})}
        try:
            self.s.validate(req)
            job = self.s.submit(req, params)
        except LanceUsageError as e:
            raise UIError(usage_message(e)) from None
        except QueueFull as e:
            raise UIError(str(e)) from None
        async for e in job.events():
            yield status_line(job, e), job, e

    def result_path(self, job: Job) -> str:
        if job.status != SUCCEEDED:
            raise UIError(f"{job.status}: {job.error}")
        return str(self.s.store.path(job.result["files"][0]))

    # -- requests of each tab -----------------------------------------------------------------
    def t2i(self, prompt, width, height, seed, steps, cfg, negative=None) -> TaskRequest:
        return TaskRequest(task="t2i", prompt=prompt, width=int(width), height=int(height), seed=int(seed),
                           sampler=self.sampler(steps, cfg), negative_prompt=_negative(negative))

    async def video(self, task, prompt, image, video_path, width, height, frames, seed, steps, cfg, side,
                    negative=None):
        from lance_deploy.media.io import read_video

        vid = fps = None
        if task == "video_edit":
            if not video_path:
                raise UIError("video_edit: upload a video to edit")
            try:
                vid, fps = await asyncio.to_thread(read_video, video_path)
            except LanceUsageError as e:
                raise UIError(usage_message(e)) from None
        if task == "i2v" and image is None:
            raise UIError("i2v: upload the first frame (an image)")
        sized = task == "t2v"
        return TaskRequest(task=task, prompt=prompt, image=image if task == "i2v" else None, video=vid, video_fps=fps,
                           width=int(width) if sized else None, height=int(height) if sized else None,
                           frames=int(frames) if task != "video_edit" else None, seed=int(seed),
                           sampler=self.sampler(steps, cfg), vae_area_side=_side(side), vit_area_side=_side(side),
                           negative_prompt=_negative(negative))

    async def ask(self, kind, image, video_path, question, max_tokens, side) -> TaskRequest:
        from lance_deploy.media.io import read_video

        if kind == "image":
            if image is None:
                raise UIError("upload an image to ask about")
            return TaskRequest(task="x2t_image", image=image, question=question, max_new_tokens=int(max_tokens),
                               vit_area_side=_side(side))
        if not video_path:
            raise UIError("upload a video to ask about")
        try:
            vid, fps = await asyncio.to_thread(read_video, video_path)
        except LanceUsageError as e:
            raise UIError(usage_message(e)) from None
        return TaskRequest(task="x2t_video", video=vid, video_fps=fps, question=question,
                           max_new_tokens=int(max_tokens), vit_area_side=_side(side))

    # -- the editing session --------------------------------------------------------------------
    async def session(self, folder: str | None, source, kind: str = "image", video_path=None,
                      frames_path=None) -> EditSession:
        """The open session, or a new one from the source image or video (`kind`). `frames_path`: the
        lossless frames of a video the Video tab generated (`kept_frames`), taken instead of `video_path`."""
        if folder:
            try:
                return EditSession.open(folder)
            except LanceUsageError as e:
                raise UIError(usage_message(e)) from None
        new = self.sessions / uuid.uuid4().hex[:12]
        if kind == "image":
            if source is None:
                raise UIError("upload a source image (or take the generated one) to start editing")
            return await asyncio.to_thread(EditSession.create, new, source)
        if not video_path and not frames_path:
            raise UIError("upload a source video (or take the generated one) to start a video editing session")
        from lance_deploy.api_session import read_frames
        from lance_deploy.media.io import read_video
        from lance_deploy.media.preprocess import TARGET_FPS

        def create() -> EditSession:
            frames, fps = (read_frames(frames_path), TARGET_FPS) if frames_path else read_video(video_path)
            return EditSession.create(new, video=frames, fps=fps)

        try:
            return await asyncio.to_thread(create)
        except LanceUsageError as e:
            raise UIError(usage_message(e)) from None

    def edit_request(self, session: EditSession, parent, prompt, seed, steps, cfg, side) -> TaskRequest:
        return session.request(prompt, parent=parent, seed=int(seed), steps=int(steps), cfg=float(cfg),
                               vae_area_side=_side(side), vit_area_side=_side(side))

    def kept_frames(self, job: Job) -> str:
        """The path of a video job's lossless frames (queued with keep_frames): its MP4 is not exact."""
        self.result_path(job)  # raises on failure
        name = next((n for n in job.result["files"] if n.endswith(".npy")), None)
        if name is None:
            raise UIError(f"job {job.id} kept no lossless frames; queue video jobs with keep_frames=True")
        return str(self.s.store.path(name))

    def record(self, session: EditSession, req, job: Job, parent) -> int:
        from lance_deploy.api_session import read_frames
        from lance_deploy.media.io import read_image

        self.result_path(job)  # raises on failure
        if session.is_video:
            output = read_frames(self.kept_frames(job))
        else:
            output = read_image(self.result_path(job))  # the lossless PNG: the exact output array
        return session.record(req, output, parent=parent).index


def history(session: EditSession | None) -> list[tuple[str, str]]:
    """The history strip: every turn's image (or video) with its prompt."""
    if session is None:
        return []
    return [(str(session.view_path(t.index)), f"turn {t.index}: {t.prompt or 'source'}"
             + ("" if t.parent is None or t.parent == t.index - 1 else f" (from turn {t.parent})"))
            for t in session.turns]
