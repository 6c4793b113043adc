"""`lance_deploy.api.LancePipeline`: from_pretrained and diffusers-style call keywords."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden_data import golden_root
from PIL import Image

from lance_deploy.api import LanceOutput, LancePipeline
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest

FAST = {"num_inference_steps": 2, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / "Lance").symlink_to(golden_root() / "ckpt", target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    try:
        yield LancePipeline.from_pretrained("~/Lance/Lance_3B", task=("t2i", "image_edit", "x2t_image"),
                                            device="cpu", dtype="float32")
    finally:
        mp.undo()


def test_keywords_match_a_task_request(pipe):
    out = pipe(prompt="a red boat", negative_prompt="blurry", seed=3, **FAST)
    assert isinstance(out, LanceOutput) and isinstance(out.images[0], Image.Image)
    req = TaskRequest(task="t2i", prompt="a red boat", negative_prompt="blurry", seed=3, height=32, width=32,
                      sampler=SamplerConfig(steps=2))
    ref = pipe(req, progress=False)  # the TaskRequest form still works on the same object
    assert np.array_equal(np.asarray(out.images[0]), ref.frames[0])
    assert np.array_equal(out.frames[0], ref.frames)
    assert out.meta[0]["negative_prompt"] == "blurry" and out.meta[0]["model"]["name"] == "Lance_3B"


def test_prompt_lists_generators_and_seeds(pipe):
    out = pipe(prompt=["a boat", "a tree"], seed=10, **FAST)
    assert len(out.images) == 2 and [m["seed"] for m in out.meta] == [10, 11]
    gen = pipe(prompt="a boat", generator=torch.Generator().manual_seed(10), **FAST)
    assert np.array_equal(np.asarray(gen.images[0]), np.asarray(out.images[0]))
    per = pipe(prompt=["a", "b"], generator=[torch.Generator().manual_seed(s) for s in (5, 9)], **FAST)
    assert [m["seed"] for m in per.meta] == [5, 9]


def test_images_in_any_form_edit_alike(pipe):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    opts = {"task": "image_edit", "prompt": "add snow", "num_inference_steps": 1}
    ref = pipe(image=arr, **opts).frames[0]
    for form in (Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
                 torch.from_numpy(arr)[None]):
        assert np.array_equal(pipe(image=form, **opts).frames[0], ref)


def test_understanding_returns_text(pipe):
    img = Image.new("RGB", (56, 56), (200, 30, 30))
    out = pipe(task="x2t_image", prompt="What colour?", image=img, max_new_tokens=3)
    assert len(out.text) == 1 and isinstance(out.text[0], str) and not out.images


def test_callback_on_step_end_sees_every_step_and_can_stop(pipe):
    seen = []
    pipe(prompt="a boat", callback_on_step_end=lambda p, i, t, kw: seen.append((p, i, t, kw["total"])), **FAST)
    assert [s[1] for s in seen] == [0, 1] and seen[0][0] is pipe and seen[0][2] == 1.0 > seen[1][2]

    def stop(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe(prompt="a boat", callback_on_step_end=stop, **FAST)


@pytest.mark.parametrize("kwargs,needle", [
    ({"prompt": 5}, "prompt: expected a string"),
    ({"prompt": ["ok", 3]}, "non-strings"),
    ({"prompt": "x", "image": object(), "task": "image_edit"}, "image: expected a path"),
    ({"prompt": "x", "seed": "7"}, "expected a whole number"),
    ({"prompt": "x", "seed": 1, "generator": torch.Generator()}, "not both"),
    ({"prompt": "x", "generator": 3}, "torch.Generator"),
    ({"prompt": "x", "num_inference_steps": 2.5}, "--steps"),
    ({"prompt": "x", "guidance_scale": "high"}, "--cfg"),
    ({"prompt": "x", "height": "32"}, "--height"),
    ({"prompt": "x", "negative_prompt": ["a"]}, "expected text"),
    ({"prompt": "x", "image": np.zeros((4, 4, 3), np.float32) + 2, "task": "image_edit"}, "[0, 1]"),
    ({"prompt": "x", "callback_on_step_end": 3}, "expected a function"),
    ({"prompt": "x", "colour": "red"}, "unknown keyword 'colour'"),
])
def test_bad_types_are_one_line_usage_errors(pipe, kwargs, needle):
    with pytest.raises(LanceUsageError) as e:
        pipe(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_from_pretrained_refuses_a_non_path():
    with pytest.raises(LanceUsageError, match="expected a folder path"):
        LancePipeline.from_pretrained(42)
