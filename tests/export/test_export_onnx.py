"""ONNX export, onnxruntime verification and the TensorRT build path, on the golden tiny checkpoint.

The whole export (every part at image_256res) is built once per module through the CLI command
objects; the other tests reuse it. CPU only, ~25 s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from golden_data import GOLDEN

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lance_deploy.artifact.graph_manifest import load_manifest, write_manifest  # noqa: E402
from lance_deploy.cli.export_cmd import build_engine_cmd, export_group, verify_cmd  # noqa: E402
from lance_deploy.core.errors import LanceError, LanceUsageError  # noqa: E402

CKPT = GOLDEN / "ckpt"
PARTS = ("gen-layer", "und-layer", "vit", "vae-decoder", "vae-encoder")
pytestmark = pytest.mark.skipif(not (CKPT / "Lance_3B").is_dir(), reason=f"golden checkpoint not found under {CKPT}")

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False


def _export(out: Path, *extra: str, parts=PARTS, preset="image_256res"):
    """The CLI export; TorchScript unless `extra` picks an exporter (the default, auto, is tested on its own)."""
    extra = extra if "--exporter" in extra else ("--exporter", "torchscript", *extra)
    args = ["onnx", "--model", str(CKPT), "--preset", preset, "--out", str(out), *extra]
    for p in parts:
        args += ["--part", p]
    return CliRunner().invoke(export_group, args)


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    # Progress lines may precede it on stderr; the error itself is exactly one line, the last.
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-256"
    result = _export(out, "--json", "--vae-tile", "8")  # a small tile keeps the VAE parts fast
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def source():
    from lance_deploy.export.sources import open_source

    return open_source(CKPT)


def _session(root: Path, name: str):
    entry = load_manifest(root).entry(name)
    return ort.InferenceSession(str(root / entry.file), providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ export + verify


def test_every_part_exports_with_manifest(export_dir):
    m = load_manifest(export_dir)
    names = [e.name for e in m.parts]
    assert names == ["gen-layer.00", "gen-layer.01", "und-layer.00", "und-layer.01", "vit",
                     "vae-decoder.first", "vae-decoder.step", "vae-encoder.first", "vae-encoder.step"]
    for e in m.parts:
        assert e.preset == "image_256res" and (export_dir / e.file).is_file()
        assert e.external_data and all((export_dir / p).is_file() for p in e.external_data)
        assert set(e.sha256) == set(e.files())
    gen = m.entry("gen-layer.00")
    assert [s.shape for s in gen.inputs] == [["n", 64], ["n", 16], ["n", 16], ["Lc", 2, 16], ["Lc", 2, 16]]
    assert gen.profiles["n"] == [3, 258, 268]
    dec = m.entry("vae-decoder.step")
    assert dec.inputs[0].shape == [1, 48, 1, 8, 8] and dec.outputs[0].shape == [1, 3, 4, 128, 128]
    assert dec.meta["tile"] == [8, 8] and dec.meta["slots"] == len(dec.inputs) - 1
    assert m.schema_version == 1 and m.producer["exporter"] == "torchscript"


def test_verify_matches_pytorch_and_records_errors(export_dir):
    result = CliRunner().invoke(verify_cmd, [str(export_dir), "--json"])
    assert result.exit_code == 0, result.output
    m = load_manifest(export_dir)  # re-read: verify rewrote it
    for e in m.parts:
        v = e.verification
        assert v["passed"] and v["provider"] == "CPUExecutionProvider", (e.name, v)
        for out, err in v["outputs"].items():
            assert err["rel_l2"] <= 1e-4 and err["max_abs"] < 1e-3, (e.name, out, err)
    # The layer graphs were run at more than one size (dynamic axes exercised).
    assert len(m.entry("gen-layer.01").verification["cases"]) == 2
    assert "n=7,Lc=0,causal=False" in m.entry("und-layer.00").verification["cases"]


def test_gen_layer_dynamic_axes_at_two_sizes(export_dir, source):
    from lance_deploy.export.parts import layer_inputs
    from lance_deploy.export.reference import kv_cache
    from lance_deploy.model.mot import Routing

    sess = _session(export_dir, "gen-layer.01")
    assert [i.shape for i in sess.get_inputs()][0] == ["n", 64]  # symbolic, not specialised
    layer = source.layer(1, with_gen=True)
    for n, lc in ((5, 2), (43, 29)):
        x, cos, sin, pk, pv = layer_inputs(source, n, lc, seed=n)
        with torch.no_grad():
            routing, cache = Routing.of(n, torch.arange(1, n - 1)), kv_cache(source, 1, pk, pv)
            ref = layer(x, (cos, sin), routing, cache, False, False)
        (got,) = sess.run(None, {"hidden": x.numpy(), "cos": cos.numpy(), "sin": sin.numpy(),
                                 "past_key": pk.numpy(), "past_value": pv.numpy()})
        assert got.shape == (n, 64) and _rel(got, ref) <= 1e-4


def test_und_layer_decode_step_and_prefill(export_dir, source):
    from lance_deploy.export.parts import layer_inputs
    from lance_deploy.export.reference import kv_cache
    from lance_deploy.model.mot import Routing

    sess = _session(export_dir, "und-layer.00")
    layer = source.layer(0, with_gen=False)
    for n, lc in ((1, 11), (23, 4)):
        x, cos, sin, pk, pv = layer_inputs(source, n, lc, seed=n)
        cache = kv_cache(source, 0, pk, pv)
        with torch.no_grad():
            ref = layer(x, (cos, sin), Routing(), cache, True, True)
        h, k, v = sess.run(None, {"hidden": x.numpy(), "cos": cos.numpy(), "sin": sin.numpy(), "past_key": pk.numpy(),
                                  "past_value": pv.numpy(), "causal": torch.tensor([True]).numpy()})
        assert k.shape == (lc + n, 2, 16)
        assert _rel(h, ref) <= 1e-4 and _rel(k, cache.keys[0]) <= 1e-4 and _rel(v, cache.values[0]) <= 1e-4


def test_vit_slice_graph_covers_a_video_grid(export_dir, source):
    """A (2, 16, 16) grid = the per-slice graph run twice: the ViT never attends across slices."""
    sess = _session(export_dir, "vit")
    vit = source.vit()
    patches = torch.randn(2 * 256, 1176, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = vit(patches, torch.tensor([[2, 16, 16]]))
    got = torch.cat([torch.from_numpy(sess.run(None, {"patches": patches[i * 256:(i + 1) * 256].numpy()})[0])
                     for i in range(2)])
    assert _rel(got, ref) <= 1e-4


def test_nearest_upsample_swap_is_exact(source):
    from lance_deploy.export.vae_graphs import make_exportable
    from lance_deploy.model.vae_blocks import StreamCache

    ref_vae, vae = source.vae("decoder"), make_exportable(source.vae("decoder"))
    z = torch.randn(1, 48, 2, 3, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(vae.decode_frames(z, StreamCache()), ref_vae.decode_frames(z, StreamCache()))


def test_reexport_same_is_allowed_and_failed_export_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "und"
    assert _export(out, "--layers", "0", parts=("und-layer",)).exit_code == 0
    assert _export(out, "--layers", "0", parts=("und-layer",)).exit_code == 0  # same export: refreshed

    from lance_deploy.export import onnx_export

    def boom(*a, **k):
        raise LanceError("simulated failure")

    monkeypatch.setattr(onnx_export, "export_graph", boom)
    result = _export(tmp_path / "new", "--layers", "0", parts=("und-layer",))
    assert result.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["und"]  # no partial folder left


# ------------------------------------------------------------------ runtime seam (--backend onnxruntime)


def test_ort_gen_query_matches_forward_chunk(export_dir, source):
    from lance_deploy.checkpoint.loader import load_into
    from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
    from lance_deploy.model.lance import LanceLM
    from lance_deploy.runtime.graphs import OrtGenQuery, OrtGraphs

    with torch.device("meta"):
        lm = LanceLM(source.cfg, with_gen=True, with_lm_head=False)
    with SafetensorsReader(source.layout.weights_file) as r:
        load_into(lm, r, dtype=torch.float32, select=lambda n: n.startswith("language_model.model."))
    g = torch.Generator().manual_seed(9)
    cache = lm.new_cache()
    lm.forward_chunk(torch.randn(12, 64, generator=g), torch.arange(12).expand(3, 12), cache, causal=True)
    query, pos = torch.randn(20, 64, generator=g), torch.randint(12, 40, (3, 20), generator=g)
    with torch.no_grad():
        ref = lm.forward_chunk(query, pos, cache, causal=False, gen_rows=torch.arange(1, 19), update_cache=False)
        got = OrtGenQuery(OrtGraphs(export_dir))(lm, query, pos, cache)
    assert _rel(got, ref) <= 1e-4


def test_tiled_decode_through_graphs(export_dir, source):
    from lance_deploy.runtime.graphs import OrtGraphs, decode_tiled

    graphs, vae = OrtGraphs(export_dir), source.vae("decoder")
    one_tile = torch.randn(2, 8, 8, 48, generator=torch.Generator().manual_seed(10))
    assert (decode_tiled(graphs, one_tile) - vae.decode(one_tile)).abs().max() < 1e-4  # exact: no blending
    wide = torch.randn(1, 8, 13, 48, generator=torch.Generator().manual_seed(11))
    got, ref = decode_tiled(graphs, wide), vae.decode(wide)
    psnr = 10 * torch.log10(4 / ((got - ref) ** 2).mean())
    assert got.shape == ref.shape and psnr > 20  # blended seams: approximate by design (~30 dB here)


# ------------------------------------------------------------------ bad input


def test_missing_checkpoint_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(export_group, ["onnx", "--model", str(tmp_path / "nope"), "--part", "vit",
                                               "--preset", "image_256res", "--out", str(tmp_path / "o")])
    assert "nope" in _one_line_error(result, 2)


@pytest.mark.parametrize("args, word", [(["--part", "unet"], "--part"),
                                        (["--part", "vit", "--preset", "8k"], "--preset")])
def test_unknown_part_or_preset_is_a_usage_error(tmp_path, args, word):
    base = ["onnx", "--model", str(CKPT), "--out", str(tmp_path / "o")]
    if "--preset" not in args:
        args = args + ["--preset", "image_256res"]
    assert word in _one_line_error(CliRunner().invoke(export_group, base + args), 2)
    assert not (tmp_path / "o").exists()


def test_different_export_needs_force(tmp_path):
    out = tmp_path / "und"
    assert _export(out, "--layers", "0", parts=("und-layer",)).exit_code == 0
    result = _export(out, "--layers", "1", parts=("und-layer",))
    assert "--force" in _one_line_error(result, 2)
    assert load_manifest(out).entries()[0].name == "und-layer.00"  # untouched
    assert _export(out, "--layers", "1", "--force", parts=("und-layer",)).exit_code == 0
    assert load_manifest(out).entries()[0].name == "und-layer.01"


def test_non_export_folder_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = _export(tmp_path / "mine", "--force", "--layers", "0", parts=("und-layer",))
    assert "manifest.json" in _one_line_error(result, 2)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad", ["../escape.onnx", "/etc/passwd", "graphs/../../x.onnx"])
def test_manifest_paths_outside_the_folder_are_rejected(export_dir, tmp_path, bad):
    root = tmp_path / "copy"
    shutil.copytree(export_dir, root)
    data = json.loads((root / "manifest.json").read_text())
    data["parts"][0]["file"] = bad
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LanceUsageError, match="inside the folder|leaves the folder"):
        load_manifest(root)
    assert "manifest.json" in _one_line_error(CliRunner().invoke(verify_cmd, [str(root)]), 2)


def test_verify_fails_on_a_tampered_graph(export_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(export_dir, root)
    m = load_manifest(root)
    m.parts = [m.entry("vit")]
    write_manifest(root, m)
    with open(root / m.parts[0].external_data[0], "r+b") as f:  # flip weight bytes
        f.seek(64)
        f.write(b"\x00\x01\x02\x03")
    assert "sha256" in _one_line_error(CliRunner().invoke(verify_cmd, [str(root)]), 1)


# ------------------------------------------------------------------ TensorRT


def test_engine_metadata_mismatch_is_refused(tmp_path):
    from lance_deploy.runtime.tensorrt import check_engine_metadata, engine_dir

    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    meta = {"gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "tensorrt": "10.9.0"}
    with pytest.raises(LanceError, match="rebuild"):
        check_engine_metadata(meta, gpu, "10.9.0", tmp_path / "x.plan")
    check_engine_metadata(dict(meta, gpu=gpu["name"], compute_capability="9.0"), gpu, "10.9.0", tmp_path / "x.plan")
    assert engine_dir(tmp_path, gpu).name == "nvidia-h100-80gb-hbm3-sm90"


def test_profiles_come_from_the_manifest(export_dir):
    from lance_deploy.export.tensorrt_build import profile_shapes

    m = load_manifest(export_dir)
    shapes = profile_shapes(m.entry("und-layer.00"))
    assert shapes["hidden"] == ([1, 64], [1, 64], [2112, 64])
    assert shapes["past_key"][0] == [0, 2, 16] and shapes["causal"] == ([1], [1], [1])
    assert profile_shapes(m.entry("vit"))["patches"][2] == [256, 1176]


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is absent")
def test_build_engine_without_tensorrt_names_the_install(export_dir):
    line = _one_line_error(CliRunner().invoke(build_engine_cmd, [str(export_dir), "--precision", "fp16"]), 1)
    assert "pip install tensorrt" in line


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")
def test_build_and_load_engine(export_dir, tmp_path):
    from lance_deploy.runtime.tensorrt import load_engine

    cache = tmp_path / "timing.cache"
    result = CliRunner().invoke(build_engine_cmd, [str(export_dir), "--precision", "fp16", "--graph", "gen-layer.00",
                                                   "--graph", "vae-decoder.first", "--workspace-gib", "2",
                                                   "--timing-cache", str(cache)])
    assert result.exit_code == 0, result.output
    plans = sorted((export_dir / "engines").glob("*/*.plan"))
    assert [p.stem for p in plans] == ["gen-layer.00", "vae-decoder.first"] and cache.stat().st_size > 0
    meta = json.loads(plans[0].with_suffix(".json").read_text())
    assert meta["profiles"]["hidden"][2] == [268, 64] and meta["precision"] == "fp16"
    assert load_engine(plans[0]) is not None


# ------------------------------------------------------------------ imports / exporter choice




def test_default_exporter_is_dynamo_where_it_verifies(tmp_path):
    pytest.importorskip("onnxscript")
    out = tmp_path / "dyn"
    result = _export(out, "--layers", "0", "--exporter", "auto", "--json", parts=("gen-layer",))
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # dynamo's progress lines stay off stdout
    m = load_manifest(out)
    assert {e.name: (e.meta["exporter"], e.meta["opset"]) for e in m.parts} == {"gen-layer.00": ("dynamo", 18)}
    assert [s.shape[0] for s in m.entry("gen-layer.00").inputs] == ["n", "n", "n", "Lc", "Lc"]  # still dynamic
    verified = CliRunner().invoke(verify_cmd, [str(out)])  # runs n=18 and n=7
    assert verified.exit_code == 0 and "TensorRT lint ok" in verified.output, verified.output


def test_auto_exporter_choice_per_graph():
    from lance_deploy.export.onnx_export import exporter_for
    from lance_deploy.export.parts import GraphJob

    def job(part):
        return GraphJob(f"{part}.x", part, torch.nn.Identity(), (), [], [])

    assert {p: exporter_for(job(p), "auto", False) for p in PARTS} == {
        "gen-layer": "dynamo", "und-layer": "dynamo", "vit": "dynamo",
        "vae-decoder": "torchscript", "vae-encoder": "torchscript"}
    assert exporter_for(job("gen-layer"), "auto", True) == "torchscript"  # Q/DQ graphs
    assert exporter_for(job("vae-decoder"), "dynamo", False) == "dynamo"  # forced
    with pytest.raises(LanceUsageError, match="only the TorchScript exporter lowers to Q/DQ"):
        exporter_for(job("gen-layer"), "dynamo", True)
