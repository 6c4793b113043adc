"""`run --backend onnxruntime|tensorrt`: the denoising query and the VAE decode through exported graphs.

On the golden tiny checkpoint: the t2i golden case through the CLI with graphs exported into a
cache on first use (same image as the torch backend, PSNR >= 40 dB; final latents within rel
1e-4), a size whose decode needs several VAE tiles (compared with the torch tiled decode using
the same tile plan and feather weights), and the error paths. CPU, ~1 min.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from golden_requests import run_args

from golden_data import GOLDEN, assert_close, assert_uint8_close, load_case

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CKPT = GOLDEN / "ckpt" / "Lance_3B"
pytestmark = pytest.mark.skipif(not CKPT.is_dir(), reason=f"golden checkpoint not found at {CKPT}")

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False


def _cli(args):
    from lance_deploy.cli import cli

    return CliRunner().invoke(cli, args)


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output, result.output
    return errors[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def t2i_runs(tmp_path_factory, cache):
    """The golden t2i case run through the CLI with each backend: {backend: (latent, image, output)}."""
    from PIL import Image
    from safetensors.torch import load_file

    meta, golden = load_case("t2i")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANCE_EXPORT_CACHE", str(cache))
        for backend in ("torch", "onnxruntime", "onnxruntime"):  # the second onnxruntime run reuses the cache
            d = tmp_path_factory.mktemp(backend)
            args = ["run"] + run_args(meta, golden, d) + ["--model", str(CKPT), "--backend", backend,
                                                          "--out", str(d / "out.png")]
            result = _cli(args)
            assert result.exit_code == 0, result.output
            latent = load_file(str(d / "latents.safetensors"))["final_latent_0"]
            runs.setdefault(backend, []).append((latent, np.array(Image.open(d / "out.png")), result.output))
    return runs, golden


def test_t2i_onnxruntime_matches_torch(t2i_runs):
    runs, golden = t2i_runs
    (lat_t, img_t, _), (lat_o, img_o, out) = runs["torch"][0], runs["onnxruntime"][0]
    assert "exporting gen-layer" in out and "exporting vae-decoder" in out
    assert _rel(lat_o, lat_t) <= 1e-4
    assert img_o.shape == img_t.shape == (96, 96, 3) and _psnr(img_o, img_t) >= 40.0
    # and still the upstream golden result (the parity criterion of tests/test_golden_tasks.py)
    assert_close(lat_o, golden["final_latent_0"], "onnxruntime final_latent_0")
    assert_uint8_close(img_o[None], golden["decoded_uint8"], "onnxruntime decoded_uint8")


def test_cached_graphs_are_reused(t2i_runs, cache):
    runs, _ = t2i_runs
    (lat_1, img_1, _), (lat_2, img_2, out) = runs["onnxruntime"]
    assert "exporting" not in out  # same checkpoint fingerprint and request: no second export
    assert torch.equal(lat_1, lat_2) and np.array_equal(img_1, img_2)
    names = sorted(p.name.split("-", 2)[-1] for p in cache.iterdir())
    assert names == ["gen-layer", "vae-decoder-6x6"]  # a 6x6 latent: one tile covering it (exact decode)


@pytest.fixture(scope="module")
def small_tile_export(tmp_path_factory):
    """gen-layer + vae-decoder graphs with a 4x4-cell VAE tile (overlap 1), for multi-tile decodes."""
    from lance_deploy.export.onnx_export import ExportRequest, export_onnx

    out = tmp_path_factory.mktemp("tile4") / "graphs"
    export_onnx(ExportRequest(model=CKPT, parts=("gen-layer", "vae-decoder"), preset="image_256res", out=out,
                              vae_tile=(4, 4)))
    return out


def test_multi_tile_decode_matches_torch_tiled_decode(small_tile_export):
    from lance_deploy.export.backend import make_backend
    from lance_deploy.model.vae_tiling import TilingConfig, plan_tiles, tiled_decode
    from lance_deploy.pipeline.pipeline import LancePipeline
    from lance_deploy.pipeline.sampler import SamplerConfig
    from lance_deploy.pipeline.tasks import TaskRequest
    from lance_deploy.runtime.graphs import OrtGraphs, decoder_tiling

    def request():
        return TaskRequest(task="t2i", prompt="a red boat", height=96, width=160, seed=3,
                           sampler=SamplerConfig(steps=3, shift=3.5, cfg_scale=4.0))

    backend = make_backend("onnxruntime", CKPT, graphs=small_tile_export)
    ort_pipe = LancePipeline.from_path(CKPT, "t2i", device="cpu", dtype="float32", backend=backend)
    torch_pipe = LancePipeline.from_path(CKPT, "t2i", device="cpu", dtype="float32")
    got, ref = ort_pipe(request(), progress=False), torch_pipe(request(), progress=False)
    latent = got.latents[-1]  # [1, 6, 10, 48]
    assert _rel(latent, ref.latents[-1]) <= 1e-4

    (th, tw), overlap = decoder_tiling(OrtGraphs(small_tile_export))
    cfg = TilingConfig(tile=th, overlap=overlap, enabled=True, global_attention=False)  # each tile runs the whole VAE
    assert (th, tw) == (4, 4) and len(plan_tiles(6, 10, cfg)) == 6
    torch_tiled = tiled_decode(torch_pipe.c.vae, latent, cfg)
    ort_tiled = backend.decode(torch_pipe.c.vae, latent)
    assert ort_tiled.shape == torch_tiled.shape == (3, 1, 96, 160)
    assert (ort_tiled - torch_tiled).abs().max() <= 1e-4  # same tiles, same weights: only per-tile float noise
    from lance_deploy.media.io import to_uint8

    assert np.array_equal(got.frames, to_uint8(ort_tiled)) and _psnr(got.frames, to_uint8(torch_tiled)) >= 40.0


def test_latent_smaller_than_the_exported_tile(small_tile_export, tmp_path):
    args = ["run", "t2i", "--model", str(CKPT), "--prompt", "x", "--height", "48", "--width", "96", "--steps", "1",
            "--device", "cpu", "--backend", "onnxruntime", "--graphs", str(small_tile_export),
            "--out", str(tmp_path / "o.png"), "--quiet"]
    assert "smaller than the exported VAE tile" in _one_line_error(_cli(args), 2)


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is absent")
def test_tensorrt_backend_without_tensorrt_names_the_install(tmp_path):
    args = ["run", "t2i", "--model", str(CKPT), "--prompt", "x", "--backend", "tensorrt", "--out", str(tmp_path / "o.png")]
    assert "pip install tensorrt" in _one_line_error(_cli(args), 1)
    assert not (tmp_path / "o.png").exists()


def test_backend_usage_errors(small_tile_export, tmp_path):
    import json
    import shutil

    base = ["run", "t2i", "--model", str(CKPT), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    assert "--graphs" in _one_line_error(_cli(base + ["--graphs", str(small_tile_export)]), 2)
    x2t = ["run", "x2t_image", "--model", str(CKPT), "--question", "q", "--backend", "onnxruntime"]
    assert "--backend torch" in _one_line_error(_cli(x2t), 2)
    other = tmp_path / "other"
    shutil.copytree(small_tile_export, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"]["files"][0]["head_sha256"] = "0" * 64  # as if exported from another checkpoint
    (other / "manifest.json").write_text(json.dumps(manifest))
    line = _one_line_error(_cli(base + ["--backend", "onnxruntime", "--graphs", str(other)]), 2)
    assert "different checkpoint" in line


def test_python_api_backend_names(monkeypatch, tmp_path):
    from lance_deploy.api import load_pipeline
    from lance_deploy.export.backend import OrtBackend

    monkeypatch.setenv("LANCE_EXPORT_CACHE", str(tmp_path))
    assert load_pipeline(CKPT, "t2i", device="cpu", backend="torch").backend is None
    assert isinstance(load_pipeline(CKPT, "t2i", device="cpu", backend="onnxruntime").backend, OrtBackend)
    assert not any(tmp_path.iterdir())  # nothing is exported before a request needs it
