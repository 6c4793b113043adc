"""Lance input preprocessing against the upstream golden fixtures.

Every pixel tensor that upstream's `ValidationDataset` produced for the golden
cases is rebuilt from the case's raw `media_uint8` (and fps) with
`lance_deploy.media.preprocess`; `to_uint8` is checked against upstream's
`decode_video_tensor` output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from golden_data import GOLDEN

from lance_deploy.core.errors import MediaError
from lance_deploy.media.io import to_uint8
from lance_deploy.media.preprocess import (
    PRESETS,
    bucket_size,
    sample_frame_indices,
    vae_pixels,
    vit_pixels,
)

CASES = GOLDEN / "cases"

# README section 7: float32 tensors.
REL_L2, MAX_ABS = 1e-4, 1e-3

MEDIA_CASES = ["vit_image", "vit_video", "x2t_image", "x2t_video", "image_edit", "i2v", "video_edit"]
DECODE_CASES = ["t2i", "t2v", "i2v", "image_edit", "video_edit"]


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The case JSON and its tensors; skip when the golden set is not on this machine."""
    if not (CASES / f"{name}.json").is_file():
        pytest.skip(f"golden case {name} not found under {CASES} (set LANCE_GOLDEN)")
    from safetensors.torch import load_file

    return json.loads((CASES / f"{name}.json").read_text()), load_file(str(CASES / f"{name}.safetensors"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """README tolerance for float32 tensors: rel-L2 and max-abs."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}"
    diff = (actual - expected).double()
    rel = (diff.norm() / expected.double().norm()).item()
    max_abs = diff.abs().max().item()
    assert rel <= REL_L2 and max_abs <= MAX_ABS, f"{what}: rel-L2 {rel:.3g}, max-abs {max_abs:.3g}"


def area_sides(case: dict) -> tuple[int, int]:
    """(VAE side, ViT side) the case was preprocessed with (harness override or preset)."""
    params = case["params"]
    override = params.get("bucket_area_side_override")
    if override:
        return override["vae"], override["vit"]
    if "vit_bucket_area_side" in params:
        return PRESETS["image_256res"].vae_side, params["vit_bucket_area_side"]
    preset = PRESETS[params["resolution_preset"]]
    return preset.vae_side, preset.vit_side


def case_frames(case: dict, tensors: dict) -> tuple[np.ndarray, bool]:
    """The media frames upstream transformed: videos with an fps go through the sampler."""
    media = case["inputs"]["media"]
    frames = tensors["media_uint8"].numpy()
    is_video = media["kind"] == "video"
    if is_video and media.get("fps"):
        frames = frames[sample_frame_indices(frames.shape[0], media["fps"])]
    return frames, is_video


# --------------------------------------------------------------------------- presets


def test_presets_match_upstream_table():
    expected = {
        "video_192p": (256, 224), "image_256res": (256, 224), "image_512res": (512, 448),
        "image_768res": (768, 672), "video_360p": (480, 476), "video_480p": (640, 616),
    }
    assert {name: (p.vae_side, p.vit_side) for name, p in PRESETS.items()} == expected
    assert all(name == p.name for name, p in PRESETS.items())


@pytest.mark.parametrize(
    "side, hw, bucket",
    [
        (256, (512, 512), (256, 256)), (256, (900, 1600), (192, 336)), (512, (900, 1600), (384, 688)),
        (768, (900, 1600), (576, 1024)), (768, (900, 2100), (496, 1152)), (480, (900, 1600), (352, 624)),
        (640, (900, 1600), (480, 848)), (640, (900, 2100), (416, 976)), (640, (1600, 900), (848, 480)),
        (256, (120, 170), (224, 304)), (224, (120, 170), (192, 256)), (224, (90, 160), (160, 288)),
    ],
)
def test_bucket_size_examples(side, hw, bucket):
    """The example buckets of lance.md 6.3 and the golden shapes."""
    assert bucket_size(*hw, side) == bucket


# --------------------------------------------------------------------------- preprocess_presets


def test_preset_image_transforms():
    case, t = load_case("preprocess_presets")
    image = t["image_uint8"].numpy()
    vae_side, vit_side = case["params"]["vae_area_side"], case["params"]["vit_area_side"]
    assert_close(vae_pixels(image[None], vae_side, is_video=False), t["image_vae"], "image_vae")
    vit = vit_pixels(image[None], vit_side, is_video=False)
    assert vit.shape[1] == 2 and torch.equal(vit[:, 0], vit[:, 1]), "an image is repeated to T=2"
    assert_close(vit[:, :1], t["image_vit"], "image_vit")


def test_frame_sampler_results():
    case, _ = load_case("preprocess_presets")
    results = case["frame_sampler"]["results"]
    assert results, "no frame sampler results in the case"
    for key, expected in results.items():
        n, fps = key.split("@")
        assert sample_frame_indices(int(n), float(fps)) == expected, key


def test_frame_sampler_rules():
    # 4k+1 frames at 12 fps, at most 6 s: 20 s at 30 fps -> 72 -> 69 frames over the whole clip.
    idx = sample_frame_indices(600, 30.0)
    assert len(idx) == 69 and idx[0] == 0 and idx[-1] == 599
    # The container fps is rounded first: 23.976 behaves like 24.
    assert sample_frame_indices(48, 23.976) == sample_frame_indices(48, 24)
    # Slow clips repeat frames rather than invent them.
    idx = sample_frame_indices(10, 6.0)
    assert len(idx) == 17 and idx == sorted(idx) and max(idx) == 9
    # Too short for one sampled frame: keep the first (upstream would crash).
    assert sample_frame_indices(1, 30.0) == [0]
    with pytest.raises(MediaError):
        sample_frame_indices(5, 0.2)
    with pytest.raises(MediaError):
        sample_frame_indices(0, 24.0)


# --------------------------------------------------------------------------- task cases


@pytest.mark.parametrize("name", MEDIA_CASES)
def test_case_pixels(name):
    """vae_pixels_* / vit_pixels_* / vit_pixels of every case with media."""
    case, t = load_case(name)
    frames, is_video = case_frames(case, t)
    vae_side, vit_side = area_sides(case)
    checked = 0
    for key, expected in t.items():
        if key.startswith("vae_pixels"):
            assert_close(vae_pixels(frames, vae_side, is_video), expected, f"{name}.{key}")
            checked += 1
        elif key.startswith("vit_pixels"):
            assert_close(vit_pixels(frames, vit_side, is_video), expected, f"{name}.{key}")
            checked += 1
    assert checked, f"{name} has no pixel tensor"


def test_x2t_video_sampling():
    """16 frames @24 fps -> 5 sampled frames -> the ViT pads to T = 6."""
    case, t = load_case("x2t_video")
    media = t["media_uint8"].numpy()
    idx = sample_frame_indices(media.shape[0], case["inputs"]["media"]["fps"])
    assert idx == [0, 3, 7, 11, 15]
    pixels = vit_pixels(media[idx], area_sides(case)[1], is_video=True)
    assert pixels.shape[1] == 6 and torch.equal(pixels[:, 4], pixels[:, 5])
    assert_close(pixels, t["vit_pixels_0"], "x2t_video.vit_pixels_0")


def test_vit_odd_frames_and_vae_keeps_t():
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
    vit = vit_pixels(frames, 112, is_video=True)
    vae = vae_pixels(frames, 128, is_video=True)
    assert vit.shape[1] == 6 and vae.shape[1] == 5
    assert vit.shape[2] % 28 == 0 and vit.shape[3] % 28 == 0
    assert vae.shape[2] % 16 == 0 and vae.shape[3] % 16 == 0
    assert vae.min() >= -1 and vae.max() <= 1


def test_rejects_bad_frames():
    with pytest.raises(MediaError):
        vae_pixels(np.zeros((1, 8, 8, 3), dtype=np.float32), 128, is_video=False)
    with pytest.raises(MediaError):
        vit_pixels(np.zeros((2, 8, 8, 3), dtype=np.uint8), 112, is_video=False)


# --------------------------------------------------------------------------- decoded -> uint8


@pytest.mark.parametrize("name", DECODE_CASES)
def test_to_uint8_matches_decode_video_tensor(name):
    _, t = load_case(name)
    actual = to_uint8(t["decoded_0"]).astype(np.int16)
    expected = t["decoded_uint8"].numpy().astype(np.int16)
    assert actual.shape == expected.shape
    diff = np.abs(actual - expected)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3
