"""`run` refuses what the model cannot do before anything is loaded: one line, exit 2, milliseconds."""

from __future__ import annotations

import os
import time

import pytest
from click.testing import CliRunner
from golden_data import golden_root
from PIL import Image

from lance_deploy.cli import cli

CKPT_IMAGE = "Lance_3B"
CKPT_VIDEO = "Lance_3B_Video"


@pytest.fixture(scope="module")
def ckpt():
    import lance_deploy.cli.run_request
    import lance_deploy.pipeline.pipeline
    import lance_deploy.planning.request

    return golden_root() / "ckpt"


@pytest.fixture
def no_load(monkeypatch):
    """Fail loudly if a refusal got as far as loading weights or decoding media."""
    from lance_deploy.media import io as media_io
    from lance_deploy.pipeline.pipeline import LancePipeline

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the request was refused")

    monkeypatch.setattr(LancePipeline, "from_path", classmethod(loaded))
    return monkeypatch, media_io


def _run(args) -> tuple[int, str, float]:
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["run", *map(str, args)])
    elapsed = time.perf_counter() - start
    err = res.stderr if hasattr(res, "stderr") else res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, err, elapsed


def _refused(args, *needles, code: int = 2) -> str:
    exit_code, err, elapsed = _run(args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert exit_code == code, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("Error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert elapsed < 2.0, f"refused after {elapsed:.2f} s"
    return lines[0]


def _image(tmp_path, name="pic.png", size=(80, 80)):
    path = tmp_path / name
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


@pytest.mark.parametrize("extra, needles", [
    ([], ["t2i needs --prompt"]),
    (["--prompt", "x", "--cfg", "inf"], ["--cfg", "finite"]),
    (["--prompt", "x", "--cfg", "1e308"], ["--cfg"]),
    (["--prompt", "x", "--cfg", "nan"], ["--cfg"]),
    (["--prompt", "x", "--shift", "nan"], ["--shift"]),
    (["--prompt", "x", "--shift", "inf"], ["--shift"]),
    (["--prompt", "x", "--height", "0"], ["--height", "multiple of 16"]),
    (["--prompt", "x", "--height", "72"], ["--height", "16"]),
    (["--prompt", "x", "--seed", str(2**70)], ["--seed", str(2**63 - 1)]),
    (["--prompt", "x", "--steps", str(10**12)], ["--steps", "1000"]),
    (["--prompt", "x", "--height", "100000", "--width", "100000"], ["--height", "2048"]),
    (["--prompt", "x", "--height", "2048", "--width", "2048"], ["pixel limit"]),
    (["--prompt", "x" * 100_000], ["--prompt", "characters"]),
    (["--prompt", "x", "--resolution", "huge"], ["--resolution"]),
])
def test_t2i_limits(ckpt, no_load, extra, needles):
    line = _refused(["t2i", "--model", ckpt / CKPT_IMAGE, *extra], *needles)
    assert "768" not in line or "--resolution" in line  # --height 0 never turns into the default


@pytest.mark.parametrize("extra, needles", [
    (["--vae-area-side", "0"], ["--vae-area-side"]),
    (["--vit-area-side", "-1"], ["--vit-area-side"]),
    (["--vit-area-side", "20"], ["--vit-area-side", "too small"]),
])
def test_bucket_overrides_are_checked_before_the_image_is_decoded(ckpt, no_load, tmp_path, extra, needles):
    monkeypatch, media_io = no_load

    def decoded(*a, **k):
        raise AssertionError("the image was decoded before the options were checked")

    monkeypatch.setattr(media_io, "read_image", decoded)
    _refused(["image_edit", "--model", ckpt / CKPT_IMAGE, "--prompt", "x", "--image", _image(tmp_path), *extra],
             *needles)


def test_max_new_tokens_cap(ckpt, no_load, tmp_path):
    _refused(["x2t_image", "--model", ckpt / CKPT_IMAGE, "--question", "q", "--image", _image(tmp_path),
              "--max-new-tokens", str(10**9)], "--max-new-tokens", "4096")


def test_media_task_without_media_is_refused_before_loading(ckpt, no_load):
    _refused(["i2v", "--model", ckpt / CKPT_VIDEO, "--prompt", "x"], "i2v needs --image")


def test_video_edit_refuses_a_still_picture(ckpt, no_load, tmp_path):
    line = _refused(["video_edit", "--model", ckpt / CKPT_VIDEO, "--prompt", "x", "--video", _image(tmp_path)],
                    "image_edit", "video")
    assert "single frame" in line


def test_fps_must_be_finite(ckpt, no_load, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        _image(frames, f"{i}.png", (16, 16))
    _refused(["video_edit", "--model", ckpt / CKPT_VIDEO, "--prompt", "x", "--video", frames, "--fps", "inf"],
             "--fps")


def test_huge_input_image_is_refused_from_its_header(ckpt, no_load, tmp_path):
    monkeypatch, _ = no_load
    path = _image(tmp_path, "big.png", (300, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow's own cap is respected
    _refused(["image_edit", "--model", ckpt / CKPT_IMAGE, "--prompt", "x", "--image", path], "big.png", "pixel")


def test_gpu_memory_too_small_is_a_sensible_one_liner(ckpt, no_load):
    line = _refused(["t2i", "--model", ckpt / CKPT_IMAGE, "--prompt", "x", "--height", "32", "--width", "32",
                     "--device", "cpu", "--gpu-memory", "10MiB"], "--gpu-memory", "10.0 MiB", "needs at least")
    assert "0.0 GiB" not in line and "-0.0" not in line


@pytest.mark.parametrize("kind", ["devnull", "fifo", "missing"])  # a folder gets a default name (test_run_metadata)
def test_out_must_be_a_regular_file(ckpt, no_load, tmp_path, kind):
    if kind == "devnull":
        out, word = "/dev/null", "character device"
    elif kind == "fifo":
        out, word = tmp_path / "p.png", "FIFO"
        os.mkfifo(out)
    else:
        out, word = tmp_path / "nope" / "x.png", "does not exist"
    _refused(["t2i", "--model", ckpt / CKPT_IMAGE, "--prompt", "x", "--out", out], "--out", str(out), word)


def test_save_latents_must_be_a_regular_file(ckpt, no_load, tmp_path):
    _refused(["t2i", "--model", ckpt / CKPT_IMAGE, "--prompt", "x", "--out", tmp_path / "o.png",
              "--save-latents", tmp_path], "--save-latents", "folder")


def test_make_checkpoint_tiny_and_full_contradict(tmp_path):
    res = CliRunner().invoke(cli, ["make-checkpoint", "--tiny", "--full", str(tmp_path / "c")])
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, err
    assert "--tiny" in lines[0] and "--full" in lines[0] and "contradict" in lines[0]
    assert not (tmp_path / "c").exists()


def test_non_finite_init_noise_is_refused(ckpt, no_load, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"noise": torch.tensor([[float("nan")] * 48] * 4)}, str(tmp_path / "n.safetensors"))
    _refused(["t2i", "--model", ckpt / CKPT_IMAGE, "--prompt", "x", "--height", "32", "--width", "32",
              "--init-noise", tmp_path / "n.safetensors"], "--init-noise", "finite")


def test_valid_request_still_reaches_the_loader(ckpt, no_load, tmp_path):
    """The guard itself: a good request does get to loading (so the refusals above are real)."""
    with pytest.raises(AssertionError, match="loaded"):
        _run(["t2i", "--model", ckpt / CKPT_IMAGE, "--prompt", "x", "--height", "32", "--width", "32",
              "--device", "cpu", "--out", tmp_path / "o.png"])
    assert list(tmp_path.iterdir()) == []
