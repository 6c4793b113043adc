"""The HTTP bodies take `negative_prompt` into the TaskRequest (validated there like `run`'s)."""

from __future__ import annotations

from lance_deploy.serve import inputs
from lance_deploy.serve.schemas import ImageGeneration, VideoJob


def test_bodies_carry_the_negative_prompt():
    assert inputs.t2i(ImageGeneration(prompt="a boat", negative_prompt="blurry")).negative_prompt == "blurry"
    assert inputs.t2i(ImageGeneration(prompt="a boat")).negative_prompt is None
    assert inputs.video_job(VideoJob(prompt="waves", negative_prompt="static")).negative_prompt == "static"
