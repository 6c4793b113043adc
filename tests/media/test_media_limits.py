"""Input caps (checked from headers, before decoding) and verified, atomic media writes."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from PIL import Image

from lance_deploy.core.errors import LanceError, LanceUsageError, MediaError
from lance_deploy.media import io as media_io
from lance_deploy.media.io import read_image, read_video, write_image, write_video


def _one_line(exc, *needles):
    message = str(exc)
    assert "\n" not in message, message
    for n in needles:
        assert n in message, (n, message)


def _png(path, size):
    Image.new("RGB", size, (1, 2, 3)).save(path)
    return path


def test_pillow_decompression_bomb_warning_is_a_media_error(tmp_path, monkeypatch):
    path = _png(tmp_path / "bomb.png", (120, 100))
    monkeypatch.setattr(media_io, "MAX_MEDIA_PIXELS", 10**9)  # only Pillow's limit applies
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 11_000)  # 12,000 px: over it, under twice it -> warning
    with pytest.raises(MediaError) as err:
        read_image(path)
    _one_line(err.value, "bomb.png")


def test_pillow_decompression_bomb_error_is_a_media_error(tmp_path, monkeypatch):
    path = _png(tmp_path / "bomb.png", (120, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice it: Pillow raises
    with pytest.raises(MediaError) as err:
        read_image(path)
    _one_line(err.value, "bomb.png")
    assert err.value.exit_code == 2


def test_our_pixel_cap_is_checked_before_decoding(tmp_path, monkeypatch):
    path = _png(tmp_path / "wide.png", (300, 10))
    monkeypatch.setattr(media_io, "MAX_MEDIA_PIXELS", 2000)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded before the size check"))
    with pytest.raises(MediaError) as err:
        read_image(path)
    _one_line(err.value, "wide.png", "300x10", "2,000-pixel")


def test_pixel_cap_is_the_lower_of_ours_and_pillows(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a user who disabled Pillow's check
    assert media_io.pixel_cap() == media_io.MAX_MEDIA_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert media_io.pixel_cap() == 500


def test_video_decoded_size_cap_stops_early(tmp_path, monkeypatch):
    frames = np.zeros((9, 32, 32, 3), np.uint8)
    write_video(frames, tmp_path / "v.mp4")
    monkeypatch.setattr(media_io, "MAX_VIDEO_BYTES", 4 * 32 * 32 * 3)
    with pytest.raises(MediaError) as err:
        read_video(tmp_path / "v.mp4")
    _one_line(err.value, "v.mp4", "trim")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        _png(folder / f"{i}.png", (32, 32))
    with pytest.raises(MediaError) as err:
        read_video(folder, fps=12)
    _one_line(err.value, "frames")


@pytest.mark.parametrize("fps", [float("inf"), float("nan"), 0.0, -3.0, 1e9])
def test_fps_must_be_a_finite_rate(tmp_path, fps):
    with pytest.raises(LanceUsageError) as err:
        read_video(tmp_path, fps=fps)
    _one_line(err.value, "--fps")


def test_write_video_enospc_half_way_keeps_the_good_file(tmp_path, monkeypatch):
    path = tmp_path / "good.mp4"
    write_video(np.full((5, 16, 16, 3), 90, np.uint8), path)
    good = path.read_bytes()
    import imageio_ffmpeg

    def filling_disk(target, size, **kwargs):
        def writer():
            with open(target, "wb") as f:
                n = 0
                while True:
                    frame = yield
                    if frame is not None:
                        n += 1
                        f.write(b"\0" * 300)
                        if n == 3:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return writer()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", filling_disk)
    with pytest.raises(LanceUsageError) as err:
        write_video(np.zeros((5, 16, 16, 3), np.uint8), path)
    _one_line(err.value, "good.mp4", "No space left on device", "900 B", "unchanged")
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["good.mp4"]


def test_written_mp4_reads_back_one_frame(tmp_path, monkeypatch):
    calls = []
    real = media_io._check_mp4
    monkeypatch.setattr(media_io, "_check_mp4", lambda tmp, w, h: calls.append((w, h)) or real(tmp, w, h))
    write_video(np.zeros((3, 16, 32, 3), np.uint8), tmp_path / "c.mp4")
    assert calls == [(32, 16)]
    with pytest.raises(ValueError, match="not 64x16"):
        real(tmp_path / "c.mp4", 64, 16)


def test_png_that_decodes_differently_is_not_published(tmp_path, monkeypatch):
    path = tmp_path / "keep.png"
    write_image(np.full((8, 8, 3), 7, np.uint8), path)
    good = path.read_bytes()
    real_open = Image.open

    def flipped(fp, *a, **k):  # the disk hands back other pixels than were written
        img = real_open(fp, *a, **k)
        img.load()
        return img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)

    monkeypatch.setattr(Image, "open", flipped)
    image = np.zeros((8, 8, 3), np.uint8)
    image[0] = 255
    with pytest.raises(LanceError) as err:
        write_image(image, path)
    _one_line(err.value, "keep.png", "does not read back")
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["keep.png"]
