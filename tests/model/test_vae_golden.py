"""Wan2.2 VAE parity with the upstream golden fixtures, plus loader error handling."""

from __future__ import annotations

import pytest
import torch
from golden_data import GOLDEN

from lance_deploy.core.errors import CheckpointError, LanceError
from lance_deploy.model.vae import StreamCache, WanVAE, load_vae

CKPT = GOLDEN / "ckpt" / "Wan2.2_VAE.pth"
REL_L2, MAX_ABS = 1e-4, 1e-3

pytestmark = pytest.mark.skipif(not CKPT.is_file(), reason=f"golden fixtures not found at {GOLDEN} (set LANCE_GOLDEN)")


def load_case(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = GOLDEN / "cases" / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"golden case {path} not found")
    return load_file(path)


def assert_close(actual: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    assert tuple(actual.shape) == tuple(golden.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
    diff = actual.float() - golden.float()
    rel = (diff.norm() / golden.float().norm()).item()
    mx = diff.abs().max().item()
    assert rel <= REL_L2 and mx <= MAX_ABS, f"{what}: rel-L2 {rel:.3g}, max-abs {mx:.3g}"


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return load_vae(CKPT)


@pytest.mark.parametrize("case", ["vae_image", "vae_video"])
def test_encode(vae, case):
    t = load_case(case)
    latent, log_var = vae.encode(t["pixels"])
    assert latent.dtype == log_var.dtype == torch.float32
    assert_close(latent, t["enc_latent"], f"{case} enc_latent")
    assert_close(log_var, t["enc_log_var"], f"{case} enc_log_var")


@pytest.mark.parametrize("case", ["vae_image", "vae_video"])
def test_decode(vae, case):
    t = load_case(case)
    out = vae.decode(t["dec_input_latent"])
    assert out.dtype == torch.float32 and out.abs().max() <= 1.0
    assert_close(out, t["dec_output"], f"{case} dec_output")


@pytest.mark.parametrize("case", ["vae_image", "vae_video"])
def test_roundtrip(vae, case):
    t = load_case(case)
    latent, _ = vae.encode(t["pixels"])
    assert_close(vae.decode(latent), t["roundtrip_output"], f"{case} roundtrip_output")


@pytest.mark.parametrize("case", ["i2v", "image_edit", "video_edit"])
def test_task_condition_latent(vae, case):
    t = load_case(case)
    latent, _ = vae.encode(t["vae_pixels_0"])
    assert_close(latent, t["cond_latent_0"], f"{case} cond_latent_0")


@pytest.mark.parametrize("case", ["t2i", "t2v", "i2v", "image_edit", "video_edit"])
def test_task_decoded(vae, case):
    t = load_case(case)
    last = max(int(k.rsplit("_", 1)[1]) for k in t if k.startswith("final_latent_"))
    assert_close(vae.decode(t[f"final_latent_{last}"]), t["decoded_0"], f"{case} decoded_0")


def test_streams_resume_across_calls(vae):
    """Feeding a stream in pieces with one cache equals one call: what tiling/streaming builds on."""
    t = load_case("vae_video")
    x = t["pixels"].unsqueeze(0)  # [1, 3, 9, H, W]
    mu_once, _ = vae.encode_frames(x, StreamCache())
    cache = StreamCache()
    mu_a, _ = vae.encode_frames(x[:, :, :5], cache)
    mu_b, _ = vae.encode_frames(x[:, :, 5:], cache)
    torch.testing.assert_close(torch.cat([mu_a, mu_b], 2), mu_once, rtol=1e-5, atol=1e-5)

    z = vae.denormalize(t["dec_input_latent"].permute(3, 0, 1, 2).unsqueeze(0))  # [1, 48, 3, h, w]
    once = vae.decode_frames(z, StreamCache())
    cache = StreamCache()
    parts = [vae.decode_frames(z[:, :, i : i + 1], cache) for i in range(z.shape[2])]
    torch.testing.assert_close(torch.cat(parts, 2), once, rtol=1e-5, atol=1e-5)


def test_dims_from_state_dict():
    sd = torch.load(CKPT, weights_only=True, mmap=True)
    assert WanVAE.dims_from_state_dict(sd) == (8, 16)
    with pytest.raises(CheckpointError, match="decoder.conv1.weight"):
        WanVAE.dims_from_state_dict({"encoder.conv1.weight": sd["encoder.conv1.weight"]})


def test_decoder_only_load(vae):
    dec = load_vae(CKPT, parts=("decoder",))
    assert dec.encoder.conv1.weight.is_meta and dec.conv1.weight.is_meta
    assert not dec.decoder.conv1.weight.is_meta and not dec.conv2.weight.is_meta
    latent = load_case("vae_image")["dec_input_latent"]
    torch.testing.assert_close(dec.decode(latent), vae.decode(latent), rtol=0, atol=0)
    with pytest.raises(LanceError, match="encoder"):
        dec.encode(torch.zeros(3, 1, 16, 16))


def test_bf16_runs():
    """bf16 weights compute in bf16 and still return fp32 close to the fp32 reference."""
    bf = load_vae(CKPT, dtype=torch.bfloat16)
    assert bf.decoder.conv1.weight.dtype == torch.bfloat16
    t = load_case("vae_image")
    out = bf.decode(t["dec_input_latent"])
    assert out.dtype == torch.float32
    rel = ((out - t["dec_output"]).norm() / t["dec_output"].norm()).item()
    assert rel < 0.1


def test_corrupt_file(tmp_path):
    bad = tmp_path / "vae.pth"
    bad.write_bytes(b"this is not a torch checkpoint\x00\x01" * 64)
    with pytest.raises(CheckpointError, match="not a valid PyTorch checkpoint") as info:
        load_vae(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_truncated_file(tmp_path):
    bad = tmp_path / "vae.pth"
    bad.write_bytes(CKPT.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=str(bad)):
        load_vae(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "nope.pth")


def test_missing_key(tmp_path):
    sd = dict(torch.load(CKPT, weights_only=True))
    del sd["decoder.middle.1.to_qkv.weight"]
    path = tmp_path / "vae.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.middle\.1\.to_qkv\.weight") as info:
        load_vae(path)
    assert str(path) in str(info.value)
    # The encoder alone does not need that key.
    assert not load_vae(path, parts=("encoder",)).encoder.conv1.weight.is_meta


def test_unexpected_key_and_shape_mismatch(tmp_path):
    sd = dict(torch.load(CKPT, weights_only=True))
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["conv2.bias"] = torch.zeros(47)
    path = tmp_path / "vae.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_vae(path)
    msg = str(info.value)
    assert "unexpected keys: encoder.extra.weight" in msg and "conv2.bias [47] != [48]" in msg
