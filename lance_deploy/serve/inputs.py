"""From an HTTP body to a validated `TaskRequest`; every refusal is an `HTTPError` with one line.

Uploaded media are decoded by `media.io` (the CLI's reader, with its pixel and size caps) from a
temporary file; its messages name the request field instead of the temporary path.
"""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
from pathlib import Path

from pydantic import BaseModel, ValidationError

from lance_deploy.core.errors import LanceUsageError

SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                      re.ASCII)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff", "image/gif")
VIDEO_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/x-msvideo", "image/gif")
OUTPUT_FPS = 12  # `seconds` counts output frames at the rate videos are written


class HTTPError(Exception):
    """An error response: status, one-line message, OpenAI error type, extra headers."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers, self.param = status, message, type_, headers or {}, param


def parse(model: type[BaseModel], data) -> BaseModel:
    if not isinstance(data, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise HTTPError(400, validation_message(e), param=_loc(e.errors()[0])) from None


def _loc(err: dict) -> str:
    return ".".join(str(x) for x in err["loc"] if not isinstance(x, str) or not x[0].isupper()) or "body"


def validation_message(e: ValidationError) -> str:
    errs = e.errors()
    first, loc = errs[0], _loc(errs[0])
    if first["type"] == "extra_forbidden":
        text = f"unknown field '{loc}'"
    elif first["type"] == "missing":
        text = f"missing field '{loc}'"
    else:
        text = f"{loc}: {first['msg']}"
    return text + (f" (and {len(errs) - 1} more problem{'s' * (len(errs) > 2)})" if len(errs) > 1 else "")


def usage_message(e: LanceUsageError) -> str:
    """The pipeline's message with CLI option names (`--vae-area-side`) as request fields (`vae_area_side`)."""
    text = " ".join(str(e).split())
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), text)


def size(value: str, field: str = "size") -> tuple[int, int] | None:
    """'WIDTHxHEIGHT' -> (height, width); 'auto' -> None (the task's default)."""
    if value == "auto":
        return None
    m = SIZE.match(value)
    if not m:
        raise HTTPError(400, f"{field} {value!r}: expected WIDTHxHEIGHT such as 768x768, or auto", param=field)
    return int(m.group(2)), int(m.group(1))


def data_url(url: str, field: str, max_bytes: int) -> tuple[str | None, bytes]:
    """A data: URL -> (mime type, bytes). The server fetches nothing, so other URLs are refused."""
    m = DATA_URL.match(url)
    if not m:
        what = "an http(s) URL" if url.startswith(("http://", "https://")) else "not a data: URL"
        raise HTTPError(400, f"{field}: {what}; send the media inline as data:<type>;base64,<bytes> "
                        "(this server fetches nothing)", param=field)
    payload = url[m.end():]
    if len(payload) * 3 // 4 > max_bytes:
        raise HTTPError(413, f"{field}: {len(payload) * 3 // 4:,} bytes, over the {max_bytes:,}-byte upload limit",
                        param=field)
    try:
        data = base64.b64decode(payload, validate=True) if m.group("b64") else payload.encode()
    except (binascii.Error, ValueError):
        raise HTTPError(400, f"{field}: the data: URL is not valid base64", param=field) from None
    return m.group("mime"), data


def _check_type(mime: str | None, allowed: tuple[str, ...], field: str, kind: str) -> None:
    if mime and mime.lower() not in allowed and mime.lower() != "application/octet-stream":
        raise HTTPError(415, f"{field}: expected {kind} ({', '.join(allowed)}), got {mime}", param=field)


def image(data: bytes, field: str, mime: str | None = None):
    """Bytes of an image file -> uint8 [H, W, 3]."""
    from lance_deploy.media.io import read_image

    _check_type(mime, IMAGE_TYPES, field, "an image")
    if not data:
        raise HTTPError(400, f"{field}: empty file", param=field)
    with tempfile.TemporaryDirectory(prefix="lance-upload-") as tmp:
        path = Path(tmp) / field
        path.write_bytes(data)
        try:
            return read_image(path)
        except LanceUsageError as e:
            raise HTTPError(400, _media_message(e, path, field), param=field) from None


def video(data: bytes, field: str, mime: str | None = None, fps: float | None = None):
    """Bytes of a video file -> (uint8 [N, H, W, 3], fps)."""
    from lance_deploy.media.io import read_video

    _check_type(mime, VIDEO_TYPES, field, "a video")
    if not data:
        raise HTTPError(400, f"{field}: empty file", param=field)
    with tempfile.TemporaryDirectory(prefix="lance-upload-") as tmp:
        path = Path(tmp) / field
        path.write_bytes(data)
        try:
            return read_video(path, fps)
        except LanceUsageError as e:
            raise HTTPError(400, _media_message(e, path, field), param=field) from None


def _media_message(e: Exception, path: Path, field: str) -> str:
    return usage_message(e).replace(str(path), field)


# --------------------------------------------------------------------------- requests


def _sampler(m):
    from lance_deploy.pipeline.sampler import SamplerConfig

    return SamplerConfig(steps=m.steps, shift=m.shift, cfg_scale=m.cfg)


def _one(n: int) -> None:
    if n != 1:
        raise HTTPError(400, f"n {n}: one result per request (n=1); send several requests with other seeds", param="n")


def t2i(m):
    from lance_deploy.pipeline.tasks import TaskRequest

    _one(m.n)
    hw = size(m.size)
    return TaskRequest(task="t2i", prompt=m.prompt, height=hw and hw[0], width=hw and hw[1],
                       negative_prompt=m.negative_prompt, sampler=_sampler(m),
                       seed=m.seed, preset=m.resolution, vae_area_side=m.vae_area_side, vit_area_side=m.vit_area_side)


def image_edit(m, img):
    from lance_deploy.pipeline.tasks import TaskRequest

    _one(m.n)
    if m.size != "auto":
        raise HTTPError(400, f"size {m.size!r}: an edit keeps the input's aspect; use auto, and resolution or "
                        "vae_area_side for the working size", param="size")
    return TaskRequest(task="image_edit", prompt=m.prompt, image=img, negative_prompt=m.negative_prompt,
                       sampler=_sampler(m), seed=m.seed,
                       preset=m.resolution, vae_area_side=m.vae_area_side, vit_area_side=m.vit_area_side)


def video_job(m, img=None, vid=None, fps=None):
    """t2v / i2v / video_edit; without `task`, the media given decide (video > image > none)."""
    from lance_deploy.pipeline.tasks import TaskRequest

    task = m.task or ("video_edit" if vid is not None else "i2v" if img is not None else "t2v")
    if task != "t2v" and m.size != "auto":
        raise HTTPError(400, f"size {m.size!r}: {task} takes its size from the input; use auto", param="size")
    if task == "video_edit" and (m.frames is not None or m.seconds is not None):
        raise HTTPError(400, "video_edit takes its frames from the input video; drop frames/seconds", param="frames")
    extra = ("image" if task != "i2v" and img is not None else
             "video" if task != "video_edit" and vid is not None else None)
    if extra:
        raise HTTPError(400, f"{task} takes no input {extra} (i2v takes an image, video_edit a video)", param=extra)
    frames = m.frames
    if m.seconds is not None:
        if frames is not None:
            raise HTTPError(400, "give frames or seconds, not both", param="seconds")
        if not 0 < m.seconds <= 60:
            raise HTTPError(400, f"seconds {m.seconds:g}: expected a length above 0 up to 60", param="seconds")
        frames = int(round(m.seconds * OUTPUT_FPS / 4)) * 4 + 1
    hw = size(m.size) if task == "t2v" else None
    return TaskRequest(task=task, prompt=m.prompt, image=img, video=vid, video_fps=fps, frames=frames,
                       height=hw and hw[0], width=hw and hw[1], negative_prompt=m.negative_prompt,
                       sampler=_sampler(m), seed=m.seed,
                       preset=m.resolution, vae_area_side=m.vae_area_side, vit_area_side=m.vit_area_side)


def chat(m, max_bytes: int):
    """x2t_image / x2t_video: the system messages, the last user message's text and its one medium."""
    from lance_deploy.pipeline.tasks import TaskRequest

    _one(m.n)
    users = [msg for msg in m.messages if msg.role == "user"]
    if any(msg.role == "assistant" for msg in m.messages) or len(users) != 1:
        raise HTTPError(400, "messages: send one user message (with one image or video); Lance answers one "
                        "question about one medium, without earlier turns", param="messages")
    system = "\n".join(_text(msg.content) for msg in m.messages if msg.role in ("system", "developer")) or None
    parts = users[0].content if isinstance(users[0].content, list) else []
    question = _text(users[0].content)
    media = [p for p in parts if p.type in ("image_url", "video_url")]
    if len(media) != 1:
        raise HTTPError(400, f"messages: the user message has {len(media)} images/videos; send exactly one "
                        "image_url or video_url part", param="messages")
    if not question:
        raise HTTPError(400, "messages: the user message has no text part (the question)", param="messages")
    budget = m.max_completion_tokens if m.max_completion_tokens is not None else m.max_tokens
    opts = dict(question=question, system=system, preset=m.resolution, vit_area_side=m.vit_area_side,
                max_new_tokens=256 if budget is None else budget)
    part = media[0]
    if part.type == "image_url":
        mime, data = data_url(part.image_url.url, "image_url", max_bytes)
        return TaskRequest(task="x2t_image", image=image(data, "image_url", mime), **opts)
    mime, data = data_url(part.video_url.url, "video_url", max_bytes)
    frames, fps = video(data, "video_url", mime, m.fps)
    return TaskRequest(task="x2t_video", video=frames, video_fps=fps, **opts)


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content if p.type == "text")
