"""Reader, layout discovery, key table, streaming loader and `inspect` on the golden checkpoint."""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from golden_data import GOLDEN
from safetensors.torch import load_file
from torch import nn

from lance_deploy.checkpoint.layout import discover, discover_all
from lance_deploy.checkpoint.loader import load_into, load_vae_state_dict
from lance_deploy.checkpoint.names import (
    LATENT_POS_KEY,
    check_keys,
    component_of,
    expected_lance_shapes,
    expected_vit_shapes,
    layer_of,
)
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.checkpoint.safetensors_write import SafetensorsWriter
from lance_deploy.cli import cli
from lance_deploy.config import FULL_LLM, TINY_LLM
from lance_deploy.core.errors import CheckpointError


def _golden_root() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def ckpt() -> Path:
    root = _golden_root() / "ckpt"
    if not (root / "Lance_3B" / "model.safetensors").is_file():
        pytest.skip(f"golden checkpoint not found at {root} (set LANCE_GOLDEN)")
    return root


SAFETENSORS = ["Lance_3B/model.safetensors", "Lance_3B_Video/model.safetensors", "Qwen2.5-VL-ViT/vit.safetensors"]


# --- reader -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", SAFETENSORS)
def test_reader_matches_safetensors(ckpt, rel):
    ref = load_file(ckpt / rel)
    with SafetensorsReader(ckpt / rel) as r:
        assert sorted(r.keys()) == sorted(ref)
        for k, v in ref.items():
            info = r.info(k)
            assert info.shape == tuple(v.shape) and info.nbytes == v.numel() * v.element_size()
            assert torch.equal(r.read(k), v)
        assert r.metadata == {"format": "pt"}


def test_reader_dtypes_and_cast(ckpt):
    with SafetensorsReader(ckpt / SAFETENSORS[0]) as r:
        assert r.stored_dtypes() == {"F32"}
        w = r.read("vae2llm.weight", dtype=torch.bfloat16)
        assert w.dtype == torch.bfloat16 and torch.equal(w, r.read("vae2llm.weight").bfloat16())
    with SafetensorsReader(ckpt / SAFETENSORS[2]) as r:
        assert r.stored_dtypes() == {"BF16"}
        assert r.read("merger.ln_q.weight").dtype == torch.bfloat16


def test_reader_never_maps_the_file(ckpt, monkeypatch):
    def refuse(*a, **k):
        raise OSError(12, "Cannot allocate memory")  # what a 28 GB map does on a 24 GB machine

    monkeypatch.setattr(mmap, "mmap", refuse)
    with SafetensorsReader(ckpt / SAFETENSORS[1]) as r:
        assert r.read("vit_model.merger.mlp.0.weight").shape == (128, 128)


def _bad_file(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_reader_truncated(ckpt, tmp_path):
    data = (ckpt / SAFETENSORS[0]).read_bytes()
    p = _bad_file(tmp_path, "cut.safetensors", data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated file"):
        SafetensorsReader(p)
    p = _bad_file(tmp_path, "tiny.safetensors", data[:5])
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: truncated"):
        SafetensorsReader(p)
    p = _bad_file(tmp_path, "header.safetensors", data[:100])
    with pytest.raises(CheckpointError, match=r"header\.safetensors: truncated file or corrupt header"):
        SafetensorsReader(p)


def test_reader_corrupt_header_and_garbage(tmp_path):
    bad_json = b'{"a": {"dtype": "F32", '
    p = _bad_file(tmp_path, "json.safetensors", len(bad_json).to_bytes(8, "little") + bad_json)
    with pytest.raises(CheckpointError, match=r"json\.safetensors: corrupt header: not valid JSON"):
        SafetensorsReader(p)
    p = _bad_file(tmp_path, "garbage.bin", bytes(range(256)) * 64)
    with pytest.raises(CheckpointError, match=r"garbage\.bin: "):
        SafetensorsReader(p)
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    p = _bad_file(tmp_path, "shape.safetensors", len(hdr).to_bytes(8, "little") + hdr + bytes(64))
    with pytest.raises(CheckpointError, match=r"shape\.safetensors: corrupt header: tensor 'w' data_offsets: F32\[4, 4\] needs 64"):
        SafetensorsReader(p)
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors: file not found"):
        SafetensorsReader(tmp_path / "nothere.safetensors")


# --- layout ---------------------------------------------------------------------------------------------

def test_discover_download_folder(ckpt):
    img = discover(ckpt)
    assert img.model_dir == ckpt / "Lance_3B" and img.variant == "image" and not img.has_bundled_vit
    assert img.stored_dtype == "F32" and img.latent_rows == 4096 and img.num_tensors == 69
    assert img.vit_file == ckpt / "Qwen2.5-VL-ViT" / "vit.safetensors" and img.vae_file == ckpt / "Wan2.2_VAE.pth"
    assert img.require_vit().bundled is False and img.require_vae() == img.vae_file
    vid = discover(ckpt, variant="video")
    assert vid.variant == "video" and vid.has_bundled_vit and vid.require_vit().prefix == "vit_model."
    assert [lay.variant for lay in discover_all(ckpt)] == ["image", "video"]
    assert img.config() == TINY_LLM


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.symlink(f, dst / f.name)
    return dst


def test_discover_subfolder_variant_from_header(ckpt, tmp_path):
    # Folder names lie: the Video weights under a folder called Lance_3B are still the video model.
    d = _copy_model(ckpt / "Lance_3B_Video", tmp_path / "Lance_3B")
    lay = discover(d)
    assert lay.variant == "video" and lay.vit_file is None and lay.vae_file is None
    assert lay.require_vit().file == lay.weights_file  # bundled: no --vit needed
    with pytest.raises(CheckpointError, match="--vae"):
        lay.require_vae()
    with pytest.raises(CheckpointError, match="asked for the image model, but this is the video model"):
        discover(d, variant="image")
    img = discover(_copy_model(ckpt / "Lance_3B", tmp_path / "img"))
    with pytest.raises(CheckpointError, match="--vit"):
        img.require_vit()
    lay = discover(img.model_dir, vit=ckpt / "Qwen2.5-VL-ViT", vae=ckpt / "Wan2.2_VAE.pth")
    assert lay.require_vit().file.name == "vit.safetensors" and lay.require_vae().name == "Wan2.2_VAE.pth"


def test_discover_errors(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such file or folder"):
        discover(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither a Lance download folder"):
        discover(tmp_path)
    d = _copy_model(ckpt / "Lance_3B", tmp_path / "m")
    (d / "llm_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"m/llm_config.json: file not found"):
        discover(d)
    with pytest.raises(CheckpointError, match="--vit must be"):
        discover(ckpt, vit=tmp_path / "missing_vit")
    (tmp_path / "dl" / "Lance_3B").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no Lance_3B_Video/ folder"):
        discover(tmp_path / "dl", variant="video")


# --- key table -------------------------------------------------------------------------------------------

def test_release_key_table_counts():
    img, vid = expected_lance_shapes(FULL_LLM, "image"), expected_lance_shapes(FULL_LLM, "video")
    assert (len(img), len(vid), len(expected_vit_shapes(FULL_LLM.vision))) == (1021, 1411, 390)
    # Parameter totals quoted in lance.md §1.3 (from the release headers).
    assert sum(math.prod(s) for s in img.values()) == 6_185_205_808
    assert sum(math.prod(s) for s in vid.values()) == 7_105_548_336


def test_release_headers_reproduce_file_sizes(tmp_path):
    # With no __metadata__ our header + data sizes equal the released files byte for byte.
    for variant, size in (("image", 24_740_959_248), ("video", 28_422_373_304)):
        s = expected_lance_shapes(FULL_LLM, variant)
        w = SafetensorsWriter(tmp_path / "h.safetensors", [(k, "F32", s[k]) for k in sorted(s)])
        assert w.total_bytes == size
        w.abort()
    assert not list(tmp_path.iterdir())


def test_check_keys_on_golden(ckpt):
    for rel, expected in ((SAFETENSORS[0], expected_lance_shapes(TINY_LLM, "image")),
                          (SAFETENSORS[1], expected_lance_shapes(TINY_LLM, "video")),
                          (SAFETENSORS[2], expected_vit_shapes(TINY_LLM.vision))):
        with SafetensorsReader(ckpt / rel) as r:
            check_keys(r, expected, rel)  # the latent table's 28,672 stored rows are ignored


def test_check_keys_names_offenders():
    exp = expected_lance_shapes(TINY_LLM, "image")
    have = dict(exp)
    del have["language_model.model.layers.1.mlp.up_proj.weight"]
    have["language_model.model.layers.0.self_attn.k_proj.weight"] = (64, 64)
    have["extra.weight"] = (1,)
    have[LATENT_POS_KEY] = (123, 64)
    with pytest.raises(CheckpointError) as e:
        check_keys(have, exp, "model.safetensors")
    msg = str(e.value)
    assert msg.startswith("model.safetensors: 3 keys do not match the release layout: "
                          "missing language_model.model.layers.1.mlp.up_proj.weight; unexpected extra.weight; ")
    assert "k_proj.weight has shape [64, 64], expected [32, 64]" in msg and "\n" not in msg
    have[LATENT_POS_KEY] = (4096, 32)
    with pytest.raises(CheckpointError, match="latent_pos_embed.pos_embed has shape"):
        check_keys({LATENT_POS_KEY: (4096, 32)}, {LATENT_POS_KEY: (4096, 64)}, "f")


def test_component_and_layer():
    cases = {
        "language_model.model.layers.3.self_attn.q_proj.weight": ("und_expert", 3),
        "language_model.model.layers.35.mlp_moe_gen.down_proj.weight": ("gen_expert", 35),
        "language_model.model.layers.0.self_attn.k_norm_moe_gen.weight": ("gen_expert", 0),
        "language_model.model.norm.weight": ("und_expert", None),
        "language_model.model.norm_moe_gen.weight": ("gen_expert", None),
        "language_model.model.embed_tokens.weight": ("embed_tokens", None),
        "language_model.lm_head.weight": ("lm_head", None),
        "time_embedder.mlp.2.bias": ("bridges", None), "vae2llm.weight": ("bridges", None),
        "llm2vae.bias": ("bridges", None), LATENT_POS_KEY: ("latent_pos_embed", None),
        "vit_model.blocks.7.attn.qkv.weight": ("vit", 7), "merger.mlp.0.weight": ("vit", None),
        "encoder.middle.1.to_qkv.weight": ("vae_encoder", None), "conv1.weight": ("vae_encoder", None),
        "decoder.head.2.weight": ("vae_decoder", None), "conv2.bias": ("vae_decoder", None),
        "something.else": ("other", None),
    }
    for key, (comp, layer) in cases.items():
        assert (component_of(key), layer_of(key)) == (comp, layer), key


# --- loader -----------------------------------------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("scratch", torch.ones(2), persistent=False)


def test_load_into_round_trip(tmp_path):
    ref = {f"m.{k}": v for k, v in _Tiny().state_dict().items()}
    ref["m.steps"] = torch.arange(3)
    ref["unrelated"] = torch.zeros(5)
    with SafetensorsWriter(tmp_path / "w.safetensors", [(k, v.dtype, v.shape) for k, v in ref.items()]) as w:
        for k, v in ref.items():
            w.write(k, v)
    with torch.device("meta"):
        m = _Tiny()
    with SafetensorsReader(tmp_path / "w.safetensors") as r:
        assert load_into(m, r, dtype=torch.bfloat16, prefix="m.") == []
    assert m.proj.weight.dtype == torch.bfloat16 and not m.proj.weight.requires_grad
    assert torch.equal(m.proj.weight, ref["m.proj.weight"].bfloat16())
    assert m.steps.dtype == torch.int64 and torch.equal(m.steps, torch.arange(3))  # ints are not cast
    assert m.scratch.is_meta  # non-persistent buffers are the module's own business

    with torch.device("meta"):
        m = _Tiny()
    load_into(m, ref, dtype=None, prefix="m.", select=lambda n: n.startswith("proj."))
    assert m.proj.bias.dtype == torch.float32 and m.norm.weight.is_meta


def test_load_into_errors_name_keys():
    with torch.device("meta"):
        m = _Tiny()
    src = {"proj.weight": torch.zeros(4, 9), "proj.bias": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"state dict: 4 tensors do not fit _Tiny: missing steps; "
                                              r"missing norm.weight; missing norm.bias; proj.weight has shape"):
        load_into(m, src, dtype=torch.float32)
    src["proj.weight"] = torch.zeros(4, 8)
    assert load_into(m, src, dtype=torch.float32, strict=False) == ["steps", "norm.weight", "norm.bias"]


def test_load_new_and_load_layer(ckpt):
    from lance_deploy.checkpoint.loader import load_layer, load_new
    from lance_deploy.model.tree import layer_prefix

    layout = discover(ckpt / "Lance_3B")
    with SafetensorsReader(layout.weights_file) as r:
        layer = load_layer(r, layout.config(), 1)
        und = load_layer(r, layout.config(), 1, with_gen=False, dtype=torch.bfloat16)
        for k, t in layer.state_dict().items():
            assert t.dtype == torch.float32 and torch.equal(t, r.read(layer_prefix(1) + k, dtype=torch.float32)), k
        assert not layer.training and not any(p.is_meta or p.requires_grad for p in layer.parameters())
        assert set(und.state_dict()) < set(layer.state_dict()) and und.mlp.up_proj.weight.dtype == torch.bfloat16
        with pytest.raises(CheckpointError, match=r"1 tensors do not fit _Tiny: missing steps"):
            load_new(_Tiny, {k: v for k, v in _Tiny().state_dict().items() if k != "steps"}, dtype=None)


def test_load_vae_state_dict(ckpt, tmp_path):
    sd = load_vae_state_dict(ckpt / "Wan2.2_VAE.pth")
    assert len(sd) == 196 and sd.path.name == "Wan2.2_VAE.pth"
    with torch.device("meta"):
        m = nn.Module()
        m.conv1 = nn.Conv3d(96, 96, 1)
        m.conv2 = nn.Conv3d(48, 48, 1)
    load_into(m, sd, dtype=torch.float32)
    assert torch.equal(m.conv2.weight, sd["conv2.weight"])
    assert m.conv2.weight.data_ptr() != sd["conv2.weight"].data_ptr()  # copied out of the mmap
    bad = tmp_path / "broken.pth"
    bad.write_bytes((ckpt / "Wan2.2_VAE.pth").read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"broken\.pth: not a readable PyTorch state dict"):
        load_vae_state_dict(bad)
    with pytest.raises(CheckpointError, match=r"nope\.pth: file not found"):
        load_vae_state_dict(tmp_path / "nope.pth")


# --- inspect ----------------------------------------------------------------------------------------------

def test_inspect_json(ckpt):
    res = CliRunner().invoke(cli, ["inspect", str(ckpt), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    img, vid = out["models"]
    assert (img["variant"], vid["variant"]) == ("image", "video")
    assert img["problems"] == [] and vid["problems"] == []
    c = img["components"]
    assert c["und_expert"]["params"] == c["gen_expert"]["params"] == 74_368
    assert c["vit"]["dtypes"] == ["BF16"] and c["vit"]["note"] == "standalone"
    assert c["vae_encoder"]["params"] + c["vae_decoder"]["params"] == 2_722_420
    assert img["total"]["params"] == sum(v["params"] for v in c.values())
    assert img["total_loaded"]["params"] == img["total"]["params"] - 4096 * 64
    assert vid["components"]["vit"]["dtypes"] == ["F32"] and "bundled" in vid["components"]["vit"]["note"]
    assert vid["files"]["weights"].endswith("Lance_3B_Video/model.safetensors")


def test_inspect_table_and_errors(ckpt, tmp_path):
    res = CliRunner().invoke(cli, ["inspect", str(ckpt / "Lance_3B")])
    assert res.exit_code == 0, res.output
    assert "variant image, stored F32" in res.output and "total loaded" in res.output
    assert "regenerated at load" in res.output and "layout: matches" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope: no such file or folder" in res.output and "Traceback" not in res.output
    d = _copy_model(ckpt / "Lance_3B", tmp_path / "m")
    (d / "model.safetensors").unlink()
    shutil.copyfile(ckpt / "Lance_3B_Video" / "model.safetensors", d / "model.safetensors")
    res = CliRunner().invoke(cli, ["inspect", str(d), "--json"])
    assert json.loads(res.output)["models"][0]["variant"] == "video"
