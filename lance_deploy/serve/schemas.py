"""Request bodies in the shapes OpenAI clients send, plus Lance's own options.

Every model forbids unknown fields: a misspelt option is a 400 naming it, not a silent default.
Ranges (steps, sizes, frames, seeds, texts) are checked by `TaskRequest.validate`, the one place
that knows the model's limits; here only the types and the HTTP-side shapes are.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LanceOptions(Strict):
    """Sampler and input-bucket options every generation endpoint takes (defaults as `lance-deploy run`)."""

    seed: int = 42
    steps: int = 30
    cfg: float = 4.0  # text CFG scale; 1 disables it
    shift: float = 3.5
    negative_prompt: str | None = None  # text CFG's unconditional caption (default: none, as upstream)
    resolution: str | None = None  # input preset: image_256res ... video_480p
    vae_area_side: int | None = None
    vit_area_side: int | None = None


class ImageGeneration(LanceOptions):
    """POST /v1/images/generations (t2i)."""

    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "auto"  # WIDTHxHEIGHT, multiples of 16; auto = 768x768
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None


class ImageEdit(LanceOptions):
    """POST /v1/images/edits (image_edit), multipart; the image is the `image` file part."""

    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "auto"  # an edit keeps its input's aspect: only auto
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None


class VideoJob(LanceOptions):
    """POST /v1/videos (t2v, i2v, video_edit) as JSON (media as data: URLs) or multipart (files)."""

    prompt: str
    task: Literal["t2v", "i2v", "video_edit"] | None = None  # default from the media given
    model: str | None = None
    size: str = "auto"  # t2v: WIDTHxHEIGHT; auto = 848x480
    frames: int | None = None  # 4k+1 up to 121
    seconds: float | None = None  # OpenAI's length field: frames = seconds * 12 + 1, rounded to 4k+1
    image: str | None = None  # data: URL (i2v)
    video: str | None = None  # data: URL (video_edit)
    fps: float | None = None  # override the input video's frame rate


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: str | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(Strict):
    url: str


class VideoPart(Strict):
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletion(Strict):
    """POST /v1/chat/completions (x2t_image / x2t_video): one user turn with one image or video."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None  # accepted for client compatibility; decoding is greedy
    top_p: float | None = None  # likewise
    n: int = 1
    seed: int | None = None  # accepted; greedy decoding does not use it
    user: str | None = None
    fps: float | None = None  # override the input video's frame rate
    resolution: str | None = None
    vit_area_side: int | None = None
