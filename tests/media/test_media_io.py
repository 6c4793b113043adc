"""Image / video reading and writing (Pillow and the ffmpeg bundled with imageio-ffmpeg)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lance_deploy.core.errors import LanceError, LanceUsageError, MediaError
from lance_deploy.media import io as media_io
from lance_deploy.media.io import read_image, read_video, to_uint8, write_image, write_video


def smooth_video(t: int, h: int, w: int) -> np.ndarray:
    """Moving gradients: content H.264 compresses with a small, predictable error."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [np.stack([(xx * 3 + 6 * i) % 256, (yy * 4) % 256, np.full_like(xx, 100 + 10 * i)], -1)
              for i in range(t)]
    return np.stack(frames).astype(np.uint8)


def assert_one_line_naming(exc: BaseException, name: str) -> None:
    message = str(exc)
    assert "\n" not in message and name in message, message


def leftovers(folder) -> list[str]:
    """Temporary files the atomic writers left behind."""
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------- images


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / "out.png"
    write_image(image, path)
    back = read_image(path)
    assert back.dtype == np.uint8 and np.array_equal(back, image)
    write_image(image[None, ::-1], path)  # overwrite; a [1, H, W, 3] frame is accepted
    assert np.array_equal(read_image(path), image[::-1])
    assert leftovers(tmp_path) == []


def test_read_image_converts_like_upstream(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent -> white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (4, 4, 3)
    assert (out[:2] == [200, 0, 0]).all() and (out[2:] == 255).all()
    Image.fromarray(np.full((3, 5), 77, dtype=np.uint8)).save(tmp_path / "gray.png")
    assert (read_image(tmp_path / "gray.png") == 77).all()


def test_read_image_errors(tmp_path):
    with pytest.raises(MediaError) as missing:
        read_image(tmp_path / "nope.png")
    assert_one_line_naming(missing.value, "nope.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(MediaError) as bad:
        read_image(corrupt)
    assert_one_line_naming(bad.value, "corrupt.png")
    good = tmp_path / "good.png"
    write_image(np.zeros((64, 64, 3), dtype=np.uint8) + 9, good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(MediaError) as cut:
        read_image(truncated)
    assert_one_line_naming(cut.value, "truncated.png")


def test_write_image_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "keep.png"
    original = np.full((8, 8, 3), 3, dtype=np.uint8)
    write_image(original, path)

    def failing_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(LanceError) as err:
        write_image(np.zeros((8, 8, 3), dtype=np.uint8), path)
    assert_one_line_naming(err.value, "keep.png")
    monkeypatch.undo()
    assert np.array_equal(read_image(path), original)
    assert leftovers(tmp_path) == []


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        write_image(np.zeros((8, 8, 3), dtype=np.float32), tmp_path / "x.png")
    with pytest.raises(LanceUsageError):
        write_image(np.zeros((8, 8, 3), dtype=np.uint8), tmp_path / "missing_dir" / "x.png")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- videos


def test_mp4_round_trip(tmp_path):
    frames = smooth_video(9, 48, 64)
    path = tmp_path / "clip.mp4"
    write_video(frames, path, fps=12)
    back, fps = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert fps == pytest.approx(12.0)
    assert np.abs(back.astype(int) - frames).mean() < 4.0  # lossy, but close
    assert leftovers(tmp_path) == []
    _, forced = read_video(path, fps=30)
    assert forced == 30.0


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = smooth_video(3, 31, 45)
    write_video(frames, tmp_path / "odd.mp4", fps=24)
    back, fps = read_video(tmp_path / "odd.mp4")
    assert back.shape == (3, 32, 46, 3) and fps == pytest.approx(24.0)


def test_frame_folder(tmp_path):
    frames = smooth_video(11, 16, 24)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        write_image(frame, folder / f"frame_{i + 1}.png")  # frame_10 must come after frame_9
    (folder / "notes.txt").write_text("ignored")
    back, fps = read_video(folder, fps=8)
    assert fps == 8.0 and np.array_equal(back, frames)
    with pytest.raises(LanceUsageError) as err:
        read_video(folder)
    assert_one_line_naming(err.value, "--fps")
    assert "frames" in str(err.value)


def test_frame_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError) as err:
        read_video(empty, fps=12)
    assert_one_line_naming(err.value, "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_image(np.zeros((8, 8, 3), dtype=np.uint8), mixed / "0001.png")
    write_image(np.zeros((8, 10, 3), dtype=np.uint8), mixed / "0002.png")
    with pytest.raises(MediaError) as err:
        read_video(mixed, fps=12)
    assert_one_line_naming(err.value, "0002.png")


def test_read_video_errors(tmp_path):
    with pytest.raises(MediaError) as missing:
        read_video(tmp_path / "absent.mp4")
    assert_one_line_naming(missing.value, "absent.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError) as bad:
        read_video(corrupt)
    assert_one_line_naming(bad.value, "corrupt.mp4")
    with pytest.raises(LanceUsageError):
        read_video(corrupt, fps=0)


def test_write_video_failure_leaves_nothing(tmp_path, monkeypatch):
    def failing_writer(*args, **kwargs):
        raise RuntimeError("ffmpeg\n=== stderr ===\nbanner\nEncoder not found")

    import imageio_ffmpeg

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", failing_writer)
    with pytest.raises(LanceError) as err:
        write_video(smooth_video(2, 16, 16), tmp_path / "x.mp4")
    assert_one_line_naming(err.value, "x.mp4")
    assert "Encoder not found" in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- to_uint8


def test_to_uint8_rounding_and_clamping():
    values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, -0.5, 0.5])
    decoded = values.view(1, 1, 1, -1).expand(3, 1, 1, -1)
    out = to_uint8(decoded)
    assert out.shape == (1, 1, values.numel(), 3) and out.dtype == np.uint8
    # 0 maps to 127.5, which rounds half to even (torch.round) -> 128.
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 64, 191]
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(3, 4, 4))


def test_one_line_keeps_the_ffmpeg_reason():
    exc = OSError("Could not load meta information\n=== stderr ===\nffmpeg version x\n\nInvalid data\n")
    assert media_io._one_line(exc) == "Could not load meta information (Invalid data)"
