"""`media.metadata`: the A1111 line, chunk round trips, MP4 comments, and input coercion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.media.coerce import as_image, as_video
from lance_deploy.media.metadata import (
    FORMAT,
    _ffmetadata_value,
    a1111_parameters,
    png_text,
    read_metadata,
    sidecar_path,
    write_output,
)

META = {"format": FORMAT, "task": "t2i", "prompt": "a boat, red: at dusk", "negative_prompt": "blurry",
        "seed": 42, "steps": 30, "shift": 3.5, "cfg": 4.0, "width": 768, "height": 512, "frames": 1,
        "model": {"name": "Lance_3B", "fingerprint": "ab" * 32}, "recipe": None, "backend": "torch",
        "version": "lance-deploy 0.1.0", "note": "ünïcode ✓"}


def test_a1111_line():
    text = a1111_parameters(META)
    assert text.splitlines() == [
        "a boat, red: at dusk", "Negative prompt: blurry",
        ("Steps: 30, Sampler: Euler (flow), Schedule: shift 3.5, CFG scale: 4, Seed: 42, Size: 768x512, "
         "Model hash: ababababab, Model: Lance_3B, Task: t2i, Backend: torch, Version: lance-deploy 0.1.0")]
    assert "Negative prompt" not in a1111_parameters({**META, "negative_prompt": None})
    assert "Frames: 49" in a1111_parameters({**META, "frames": 49})


def test_png_and_mp4_round_trip_with_unicode(tmp_path):
    write_output(np.zeros((1, 16, 16, 3), np.uint8), META, tmp_path / "a.png")
    assert read_metadata(tmp_path / "a.png") == META
    with Image.open(tmp_path / "a.png") as img:
        assert img.text["parameters"] == png_text(META)["parameters"]
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    write_output(frames, META, tmp_path / "v.mp4")
    assert read_metadata(tmp_path / "v.mp4") == META == read_metadata(sidecar_path(tmp_path / "v.mp4"))


def test_default_writes_refuse_to_overwrite(tmp_path):
    write_output(np.zeros((1, 8, 8, 3), np.uint8), META, tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    with pytest.raises(FileExistsError):
        write_output(np.ones((1, 8, 8, 3), np.uint8), META, tmp_path / "a.png", overwrite=False)
    assert (tmp_path / "a.png").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary left behind


def test_ffmetadata_unescapes():
    assert _ffmetadata_value(";FFMETADATA1\ncomment={\"a\"\\=1\\;2\\#\\\\}\nencoder=x\n", "comment") == '{"a"=1;2#\\}'
    assert _ffmetadata_value(";FFMETADATA1\nencoder=x\n", "comment") is None


@pytest.mark.parametrize("bad,needle", [("{}", "not lance-deploy/1"), ("nope", "not JSON")])
def test_foreign_json_is_refused(tmp_path, bad, needle):
    (tmp_path / "x.json").write_text(bad)
    with pytest.raises(LanceUsageError, match=needle):
        read_metadata(tmp_path / "x.json")


def test_images_in_every_form_agree(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "i.png")
    forms = [tmp_path / "i.png", str(tmp_path / "i.png"), Image.fromarray(arr), arr, arr[None],
             np.moveaxis(arr, -1, 0), torch.from_numpy(arr), torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
             arr.astype(np.float64) / 255]
    for f in forms:
        assert np.array_equal(as_image(f), arr), type(f)
    assert as_image(Image.fromarray(arr).convert("L")).shape == (6, 5, 3)


def test_videos_in_every_form_agree():
    frames = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    for f in (frames, list(frames), [Image.fromarray(x) for x in frames], torch.from_numpy(frames).permute(0, 3, 1, 2)):
        got, fps = as_video(f, 8.0)
        assert np.array_equal(got, frames) and fps == 8.0


@pytest.mark.parametrize("bad,needle", [(3, "expected a path"), (np.full((2, 2, 3), 1.5), "float pixels"),
                                        (np.zeros((4, 4, 5), np.uint8), "expected an image"),
                                        (np.full((2, 2, 3), 300), "0..255"), (np.array([[["a"]]]), "uint8 or float")])
def test_bad_images_are_one_line(bad, needle):
    with pytest.raises(LanceUsageError, match=needle):
        as_image(bad)


def test_json_is_one_line():
    assert "\n" not in json.dumps(META) and "\n" not in png_text({**META, "prompt": "two\nlines"})["lance-deploy"]
