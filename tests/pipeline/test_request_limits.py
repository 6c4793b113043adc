"""`TaskRequest.validate`: every limit is one line naming the option, checked without a model;
and a NaN in the latents stops denoising at the step where it appeared."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from golden_data import golden_root

from lance_deploy.core.errors import LanceError, LanceUsageError
from lance_deploy.pipeline import limits
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest

IMAGE = np.zeros((64, 64, 3), np.uint8)


def _refused(match: str, **kw) -> str:
    kw.setdefault("task", "t2i")
    kw.setdefault("prompt", "a red boat")
    start = time.perf_counter()
    with pytest.raises(LanceUsageError) as err:
        TaskRequest(**kw).validate()
    assert time.perf_counter() - start < 0.5  # a limit, not an attempt
    message = str(err.value)
    assert "\n" not in message and match in message, message
    return message


@pytest.mark.parametrize("kw, match", [
    (dict(sampler=SamplerConfig(cfg_scale=float("inf"))), "--cfg"),
    (dict(sampler=SamplerConfig(cfg_scale=1e308)), "--cfg"),
    (dict(sampler=SamplerConfig(cfg_scale=float("nan"))), "--cfg"),
    (dict(sampler=SamplerConfig(cfg_scale=-1.0)), "--cfg"),
    (dict(sampler=SamplerConfig(shift=float("nan"))), "--shift"),
    (dict(sampler=SamplerConfig(shift=float("inf"))), "--shift"),
    (dict(sampler=SamplerConfig(shift=0.0)), "--shift"),
    (dict(sampler=SamplerConfig(steps=0)), "--steps"),
    (dict(sampler=SamplerConfig(steps=10**12)), "--steps"),
    (dict(sampler=SamplerConfig(steps=2.5)), "--steps"),
    (dict(seed=2**70), "--seed"),
    (dict(seed=-1), "--seed"),
    (dict(height=0), "--height"),
    (dict(width=-16), "--width"),
    (dict(height=72), "--height"),
    (dict(height=100_000, width=100_000), "--height"),
    (dict(height=2048, width=2048), "pixel limit"),
    (dict(max_new_tokens=10**9), "--max-new-tokens"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(prompt="x" * 100_000), "--prompt"),
    (dict(prompt=None), "t2i needs --prompt"),
    (dict(preset="image_9000res"), "--resolution"),
    (dict(task="t2v", frames=10**9), "--frames"),
    (dict(task="t2v", frames=0), "--frames"),
    (dict(task="image_edit", image=IMAGE, vae_area_side=0), "--vae-area-side"),
    (dict(task="image_edit", image=IMAGE, vit_area_side=-1), "--vit-area-side"),
    (dict(task="image_edit", image=IMAGE, vit_area_side=20), "too small"),
    (dict(task="image_edit", image=IMAGE, vae_area_side=2000), "too large"),
    (dict(task="image_edit"), "--image"),
    (dict(task="x2t_image", prompt=None, image=IMAGE), "--question"),
    (dict(task="x2t_image", prompt=None, question="q", image=IMAGE, system="s" * 9000), "--system"),
])
def test_limits_are_one_line_naming_the_option(kw, match):
    _refused(match, **kw)


def test_zero_is_not_the_default():
    """0 used to be read as "not given" and silently replaced by 768 / the preset side."""
    msg = _refused("--height", height=0)
    assert "768" not in msg
    _refused("--vae-area-side", task="image_edit", image=IMAGE, vae_area_side=0)


def test_video_edit_refuses_a_still_image():
    msg = _refused("image_edit", task="video_edit", video=IMAGE[None], video_fps=25.0)
    assert "single frame" in msg and "video" in msg
    _refused("image_edit", task="video_edit", video=np.zeros((3, 32, 32, 3), np.uint8), video_fps=24.0)
    _refused("--fps", task="video_edit", video=np.zeros((24, 32, 32, 3), np.uint8))
    TaskRequest(task="video_edit", prompt="p", video=np.zeros((12, 32, 32, 3), np.uint8), video_fps=24.0).validate()


def test_valid_edges_pass_and_validation_is_idempotent():
    req = TaskRequest(task="t2v", prompt="p", height=16, width=2048, frames=7,
                      sampler=SamplerConfig(steps=1000, shift=100.0, cfg_scale=100.0), seed=2**63 - 1,
                      max_new_tokens=4096)
    req.validate()
    req.validate()
    assert (req.height, req.width, req.frames) == (16, 2048, 5)
    assert len(req.notes) == 2  # 4k+1 and the latent-table note, once each
    assert any("latent position table" in n for n in req.notes)
    img = TaskRequest(task="image_edit", prompt="p", image=IMAGE, vae_area_side=16, vit_area_side=37).validate()
    assert (img.vae_area_side, img.vit_area_side) == (16, 37)


def test_media_is_checked_only_when_asked():
    req = TaskRequest(task="i2v", prompt="p")
    req.validate(media=False)  # the CLI's first pass, before decoding --image
    with pytest.raises(LanceUsageError, match="--image"):
        req.validate()


def test_token_cap_uses_the_tokenizer():
    class OneTokenPerChar:
        def encode(self, text):
            return list(range(len(text)))

    ok = "y" * limits.MAX_TEXT_CHARS
    TaskRequest(task="t2i", prompt=ok).validate(tokenizer=OneTokenPerChar())

    class FourPerChar:
        def encode(self, text):
            return [0] * (4 * len(text))

    with pytest.raises(LanceUsageError, match="--prompt is .* tokens"):
        TaskRequest(task="t2i", prompt="z" * 3000).validate(tokenizer=FourPerChar())


# --------------------------------------------------------------------------- NaN during denoising


@pytest.fixture(scope="module")
def t2i_pipe():
    from lance_deploy.pipeline.pipeline import LancePipeline

    return LancePipeline.from_path(golden_root() / "ckpt" / "Lance_3B", "t2i", device="cpu", dtype="float32")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_latents_stops_at_the_step(t2i_pipe, monkeypatch, bad):
    lm = t2i_pipe.c.lm
    real_velocity = lm.velocity
    calls = {"n": 0}

    def poisoned(h):
        calls["n"] += 1
        v = real_velocity(h)
        if calls["n"] == 3:  # cfg 1: one velocity a step, so this is step 3
            v = v.clone()
            v.view(-1)[5] = bad
        return v

    monkeypatch.setattr(lm, "velocity", poisoned)
    req = TaskRequest(task="t2i", prompt="a boat", height=32, width=32,
                      sampler=SamplerConfig(steps=4, cfg_scale=1.0))
    with pytest.raises(LanceError) as err:
        t2i_pipe(req, progress=False)
    message = str(err.value)
    assert "step 3 of 4" in message and ("NaN" in message or "Inf" in message), message
    assert "\n" not in message
    assert calls["n"] == 3  # stopped there: no further steps, no decode


def test_non_finite_initial_noise_is_caught_before_step_one(t2i_pipe):
    req = TaskRequest(task="t2i", prompt="a boat", height=32, width=32, sampler=SamplerConfig(steps=2))
    req.init_noise = torch.full((4, 48), float("nan"))
    with pytest.raises(LanceError, match="before the first denoising step"):
        t2i_pipe(req, progress=False)


def test_arrays_from_the_api_meet_the_pixel_cap(monkeypatch):
    from lance_deploy.media import io as media_io

    monkeypatch.setattr(media_io, "MAX_MEDIA_PIXELS", 1000)
    _refused("--image", task="image_edit", image=IMAGE)
