"""Bad input gets a one-line error naming the file or option, exit 2 (usage) or 1 (runtime)."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return golden_root() / "ckpt"


def _run(args):
    res = CliRunner().invoke(cli, args)
    err = res.stderr if hasattr(res, "stderr") else res.output
    return res.exit_code, err


def _assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_model_folder(tmp_path):
    code, err = _run(["run", "t2i", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert code == 2
    _assert_one_line(err, "nope")


def test_truncated_safetensors(ckpt, tmp_path):
    model = tmp_path / "Lance_3B"
    shutil.copytree(ckpt / "Lance_3B", model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = _run(["run", "t2i", "--model", str(model), "--vae", str(ckpt / "Wan2.2_VAE.pth"), "--prompt", "x"])
    assert code == 2
    _assert_one_line(err, "model.safetensors")


def test_corrupt_safetensors_header(ckpt, tmp_path):
    model = tmp_path / "Lance_3B"
    shutil.copytree(ckpt / "Lance_3B", model)
    with open(model / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    code, err = _run(["inspect", str(model)])
    assert code == 2
    _assert_one_line(err, "model.safetensors")


def test_wrong_variant_for_task(ckpt):
    code, err = _run(["run", "t2v", "--model", str(ckpt / "Lance_3B"), "--prompt", "x", "--height", "64",
                      "--width", "64", "--frames", "5"])
    assert code == 2
    _assert_one_line(err, "video model")


def test_undecodable_image(ckpt, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    code, err = _run(["run", "x2t_image", "--model", str(ckpt / "Lance_3B"), "--image", str(bad),
                      "--question", "q"])
    assert code == 2
    _assert_one_line(err, "broken.png")


def test_too_many_frames(ckpt):
    code, err = _run(["run", "t2v", "--model", str(ckpt / "Lance_3B_Video"), "--prompt", "x", "--height", "64",
                      "--width", "64", "--frames", "129"])
    assert code == 2
    _assert_one_line(err, "--frames", "121")


def test_size_not_multiple_of_16(ckpt):
    code, err = _run(["run", "t2i", "--model", str(ckpt / "Lance_3B"), "--prompt", "x", "--height", "72",
                      "--width", "64"])
    assert code == 2
    _assert_one_line(err, "--height", "16")


def test_frames_not_4k_plus_1_is_reported(ckpt, tmp_path):
    import json

    res = CliRunner().invoke(cli, ["run", "t2v", "--model", str(ckpt / "Lance_3B_Video"), "--prompt", "x",
                                   "--height", "32", "--width", "32", "--frames", "7", "--steps", "1",
                                   "--out", str(tmp_path / "v.mp4"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["frames"] == 5
    assert any("generating 5 frames" in n for n in summary["notes"])


def test_debug_shows_traceback(tmp_path):
    res = CliRunner().invoke(cli, ["--debug", "run", "t2i", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert res.exit_code == 2
    assert "Traceback" in (res.stderr if hasattr(res, "stderr") else res.output)


def test_bad_init_noise_shape(ckpt, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"noise": torch.zeros(3, 48)}, str(tmp_path / "n.safetensors"))
    code, err = _run(["run", "t2i", "--model", str(ckpt / "Lance_3B"), "--prompt", "x", "--height", "32",
                      "--width", "32", "--steps", "1", "--init-noise", str(tmp_path / "n.safetensors"),
                      "--out", str(tmp_path / "o.png")])
    assert code == 2
    _assert_one_line(err, "--init-noise", "(4, 48)")


def test_foreign_checkpoint_names_offending_keys(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "Lance_3B"
    shutil.copytree(ckpt / "Lance_3B", model)
    sd = load_file(str(model / "model.safetensors"))
    sd.pop("language_model.model.layers.1.mlp_moe_gen.up_proj.weight")
    sd["language_model.model.norm.weight"] = sd["language_model.model.norm.weight"][:32].clone()
    save_file(sd, str(model / "model.safetensors"))
    code, err = _run(["run", "t2i", "--model", str(model), "--vae", str(ckpt / "Wan2.2_VAE.pth"), "--prompt", "x",
                      "--height", "32", "--width", "32", "--steps", "1"])
    assert code == 2
    _assert_one_line(err, "layers.1.mlp_moe_gen.up_proj.weight", "norm.weight")


def test_video_output_needs_mp4(ckpt, tmp_path):
    code, err = _run(["run", "t2v", "--model", str(ckpt / "Lance_3B_Video"), "--prompt", "x", "--height", "32",
                      "--width", "32", "--frames", "5", "--out", str(tmp_path / "v.png")])
    assert code == 2
    _assert_one_line(err, "--out", ".mp4")
