"""`run` outputs never replace a good file with a broken one: a write error is one line naming the
path and the bytes, exit 2, and the earlier output stays byte for byte."""

from __future__ import annotations

import errno
import os
import pathlib

import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli


def _invoke(args):
    res = CliRunner().invoke(cli, ["run", *map(str, args)])
    return res.exit_code, (res.stderr if hasattr(res, "stderr") else res.output)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip().startswith(("Error", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    return lines[0]


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _t2v(out, *extra):
    ckpt = golden_root() / "ckpt" / "Lance_3B_Video"
    return ["t2v", "--model", ckpt, "--prompt", "waves", "--height", "32", "--width", "32", "--frames", "5",
            "--steps", "1", "--device", "cpu", "--quiet", "--out", out, *extra]


def test_good_mp4_survives_enospc_half_way(tmp_path, monkeypatch):
    out = tmp_path / "clip.mp4"
    code, err = _invoke(_t2v(out))
    assert code == 0, err
    good = out.read_bytes()

    import imageio_ffmpeg

    def filling_disk(path, size, **kwargs):
        def writer():
            with open(path, "wb") as f:
                sent = 0
                while True:
                    frame = yield
                    if frame is None:
                        continue
                    f.write(b"\0" * 1000)
                    sent += 1
                    if sent == 2:  # half way through the 5 frames
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return writer()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", filling_disk)
    code, err = _invoke(_t2v(out))
    line = _one_error_line(err)
    assert code == 2, err
    for needle in (str(out), "No space left on device", "1.95 KiB", "free in", "unchanged"):
        assert needle in line, (needle, line)
    assert out.read_bytes() == good
    assert _leftovers(tmp_path) == []


def test_broken_mp4_that_does_not_read_back_is_not_published(tmp_path, monkeypatch):
    """ffmpeg does not report a failed final flush; the read-back of one frame catches it."""
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"previous")
    import imageio_ffmpeg

    def garbage(path, size, **kwargs):
        def writer():
            with open(path, "wb") as f:
                while True:
                    yield
                    f.write(b"not an mp4")
        return writer()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", garbage)
    code, err = _invoke(_t2v(out))
    line = _one_error_line(err)
    assert code == 1 and str(out) in line and "does not read back" in line, err
    assert out.read_bytes() == b"previous" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["png", "latents"])
def test_png_and_latents_survive_enospc(tmp_path, monkeypatch, target):
    ckpt = golden_root() / "ckpt" / "Lance_3B"
    out, lat = tmp_path / "o.png", tmp_path / "lat.safetensors"
    args = ["t2i", "--model", ckpt, "--prompt", "boat", "--height", "32", "--width", "32", "--steps", "1",
            "--device", "cpu", "--quiet", "--out", out, "--save-latents", lat]
    code, err = _invoke(args)
    assert code == 0, err
    before = {p: p.read_bytes() for p in (out, lat)}
    victim = out if target == "png" else lat
    real = pathlib.Path.write_bytes

    def half_then_full(self, data):
        if self.name.startswith(f".{victim.name}."):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_full)
    code, err = _invoke(args)
    line = _one_error_line(err)
    assert code == 2 and str(victim) in line and "No space left on device" in line and "needs " in line, err
    assert all(p.read_bytes() == b for p, b in before.items())
    assert _leftovers(tmp_path) == []


def test_x2t_text_output_is_written_and_read_back(tmp_path):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(image)
    out = tmp_path / "answer.txt"
    code, err = _invoke(["x2t_image", "--model", golden_root() / "ckpt" / "Lance_3B", "--image", image,
                         "--question", "what?", "--max-new-tokens", "3", "--device", "cpu", "--quiet", "--out", out])
    assert code == 0, err
    assert out.read_text(encoding="utf-8").endswith("\n") and _leftovers(tmp_path) == []
