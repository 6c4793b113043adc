"""Release inputs that are damaged or hostile fail as one line naming the file, the field and what
was expected: safetensors headers (coverage, types, nesting), relabelled dtypes, configs, the VAE."""

from __future__ import annotations

import json

import pytest
import torch
from input_cases import (
    assert_cli_error,
    ckpt,
    download_copy,
    join_safetensors,
    model_copy,
    rewrite_header,
    run_cli,
)

from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.core.errors import CheckpointError


def _file(tmp_path, header: dict | bytes, data: bytes, length: int | None = None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = tmp_path / "w.safetensors"
    p.write_bytes(join_safetensors(text, data, length))
    return p


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# --- 1. safetensors headers ------------------------------------------------------------------------

def test_header_length_one_byte_short_leaves_bytes_uncovered(tmp_path):
    text = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    assert len(text) % 8, "the header must need padding for this case"
    good = _file(tmp_path, text, bytes(8))
    n = int.from_bytes(good.read_bytes()[:8], "little")
    SafetensorsReader(good).close()
    p = _file(tmp_path, text, bytes(8), length=n - 1)  # the padding's last space now counts as data
    size = p.stat().st_size
    with pytest.raises(CheckpointError) as e:
        SafetensorsReader(p)
    assert _one_line(e) == (f"{p}: corrupt header: bytes {size - 1}..{size - 1} at the end of the file are "
                            "covered by no tensor; wrong header length or data offsets")


@pytest.mark.parametrize("entries, needle", [
    ({"a": [0, 8], "b": [4, 12]}, "tensors 'a' and 'b' overlap (bytes "),
    ({"a": [4, 12]}, "are covered by no tensor (before 'a')"),
    ({"a": [0, 8], "b": [12, 20]}, "covered by no tensor (before 'b')"),
])
def test_offsets_must_tile_the_data_exactly(tmp_path, entries, needle):
    header = {k: {"dtype": "F32", "shape": [2], "data_offsets": v} for k, v in entries.items()}
    end = max(v[1] for v in entries.values())
    with pytest.raises(CheckpointError) as e:
        SafetensorsReader(_file(tmp_path, header, bytes(end)))
    assert "w.safetensors: corrupt header: " in _one_line(e) and needle in str(e.value)


def test_deeply_nested_header_is_refused_before_parsing(tmp_path):
    deep = b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(CheckpointError) as e:  # json.loads would raise RecursionError
        SafetensorsReader(_file(tmp_path, deep, b""))
    assert _one_line(e).endswith("w.safetensors: corrupt header: JSON nested deeper than 4 levels")


@pytest.mark.parametrize("entry, field, expected", [
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "dtype", "expected a dtype tag such as 'F32', got ['F32']"),
    ({"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}, "dtype", "expected a dtype tag"),
    ({"dtype": "F32", "shape": None, "data_offsets": [0, 8]}, "shape", "non-negative integers, got None"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "shape", "got [True, 2]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": "0-8"}, "data_offsets", "expected [begin, end]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}, "x", "unknown field"),
    ({"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}, "data_offsets", "F64[2] needs 16 bytes but its offsets span 8"),
])
def test_header_entry_fields_are_typed(tmp_path, entry, field, expected):
    with pytest.raises(CheckpointError) as e:
        SafetensorsReader(_file(tmp_path, {"w": entry}, bytes(8)))
    assert f"w.safetensors: corrupt header: tensor 'w' {field}: " in _one_line(e) and expected in str(e.value)


def test_inspect_refuses_a_damaged_header_in_one_line(tmp_path):
    d = model_copy(tmp_path / "m", replace=("model.safetensors",))
    rewrite_header(d / "model.safetensors", lambda h: h["vae2llm.bias"].update(shape=None))
    assert_cli_error(["inspect", d], "model.safetensors: corrupt header: tensor 'vae2llm.bias' shape: ")


# --- 2. release dtypes -----------------------------------------------------------------------------

KEY = "language_model.model.layers.0.mlp.up_proj.weight"


def test_relabelled_release_weight_is_refused_by_the_loader(tmp_path):
    d = model_copy(tmp_path / "m", replace=("model.safetensors",))
    rewrite_header(d / "model.safetensors", lambda h: h[KEY].update(dtype="I32"))  # same 4 bytes per item
    with SafetensorsReader(d / "model.safetensors") as r:
        assert r.info(KEY).dtype == "I32"  # a valid file: only the key table knows better
    assert_cli_error(["run", "t2i", "--model", d, "--prompt", "x", "--device", "cpu", "--steps", "1",
                      "--out", tmp_path / "o.png"],
                     f"model.safetensors: 1 key does not match the release layout: {KEY} is stored as I32, "
                     "expected F32 or BF16")


def test_relabelled_vit_weight_is_refused_by_load_into(tmp_path):
    from lance_deploy.checkpoint.layout import discover
    from lance_deploy.pipeline.components import load_vit

    root = download_copy(tmp_path / "dl")
    vit = root / "Qwen2.5-VL-ViT" / "vit.safetensors"
    vit.unlink()
    vit.write_bytes((ckpt() / "Qwen2.5-VL-ViT" / "vit.safetensors").read_bytes())
    rewrite_header(vit, lambda h: h["merger.ln_q.weight"].update(dtype="I16"))  # BF16 -> I16, same bytes
    layout = discover(root)
    with pytest.raises(CheckpointError) as e:
        load_vit(layout, layout.vision_config(layout.config()), torch.float32, "cpu")
    assert "vit.safetensors: 1 tensors do not fit QwenViT: merger.ln_q.weight is stored as I16, expected " \
           "floating point" in _one_line(e)


# --- 3. configs ------------------------------------------------------------------------------------

def _llm_config(**changes) -> dict:
    d = json.loads((ckpt() / "Lance_3B" / "llm_config.json").read_text())
    d.update(changes)
    return d


@pytest.mark.parametrize("doc, needle", [
    ([], "top level: expected a JSON object, got []"),
    (None, "top level: expected a JSON object, got None"),
    ("llm", "top level: expected a JSON object, got 'llm'"),
    (_llm_config(hidden_size="64"), "hidden_size: expected an integer in [1, 65536], got '64'"),
    (_llm_config(hidden_size=64.0), "hidden_size: expected an integer in [1, 65536], got 64.0"),
    (_llm_config(hidden_size=-64), "hidden_size: expected an integer in [1, 65536], got -64"),
    (_llm_config(hidden_size=None), "hidden_size: expected an integer in [1, 65536], got None"),
    (_llm_config(num_attention_heads=0), "num_attention_heads: expected an integer in [1, 65536], got 0"),
    (_llm_config(num_attention_heads=3), "num_attention_heads: 3 does not divide hidden_size 64"),
    (_llm_config(rope_scaling=[2, 3, 3]), "rope_scaling: expected an object such as"),
    (_llm_config(rms_norm_eps="1e-6"), "rms_norm_eps: expected a number in (0, 1], got '1e-6'"),
    (_llm_config(num_hidden_layers=10**9), "num_hidden_layers: expected an integer in [1, 1024], got 1000000000"),
    (_llm_config(rope_scaling={"mrope_section": [2, 3, 4]}), "rope_scaling.mrope_section: [2, 3, 4] must sum to head_dim / 2 = 8"),
    (_llm_config(vision_config={"hidden_size": 30, "num_heads": 4}), "vision_config.num_heads: 4 does not divide"),
])
def test_llm_config_fields_are_typed(tmp_path, doc, needle):
    d = model_copy(tmp_path / "m", replace=("llm_config.json",))
    (d / "llm_config.json").write_text(json.dumps(doc))
    assert_cli_error(["memory-plan", "--model", d, "--task", "t2i", "--gpu-memory", "16GiB"],
                     f"{d / 'llm_config.json'}: {needle}")


def test_truncated_vit_config_fails_the_same_in_run_and_memory_plan(tmp_path):
    from PIL import Image

    root = download_copy(tmp_path / "dl")
    cfg = root / "Qwen2.5-VL-ViT" / "config.json"
    cfg.write_bytes(cfg.read_bytes()[:40])
    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "in.png")
    plan = assert_cli_error(["memory-plan", "--model", root, "--task", "x2t_image", "--gpu-memory", "16GiB"],
                            f"{cfg}: not valid JSON (")
    run = assert_cli_error(["run", "x2t_image", "--model", root, "--image", tmp_path / "in.png", "--question", "?",
                            "--device", "cpu", "--max-new-tokens", "1", "--out", tmp_path / "o.txt"])
    assert run == plan


def test_vit_config_fields_are_typed(tmp_path):
    root = download_copy(tmp_path / "dl")
    cfg = root / "Qwen2.5-VL-ViT" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "fullatt_block_indexes": [5]}))
    assert_cli_error(["memory-plan", "--model", root, "--task", "x2t_image", "--gpu-memory", "16GiB"],
                     f"{cfg}: fullatt_block_indexes[0]: expected an integer in [0, 1], got 5")


# --- 6. the VAE before quantize seals it -------------------------------------------------------------

def _vae(tmp_path, edit) -> str:
    sd = dict(torch.load(ckpt() / "Wan2.2_VAE.pth", weights_only=True))
    edit(sd)
    torch.save(sd, tmp_path / "vae.pth")
    return str(tmp_path / "vae.pth")


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.clear(), "vae.pth: holds no tensors; expected the Wan2.2 VAE state dict"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(("decoder.", "conv2."))],
     "vae.pth: no VAE decoder tensors (decoder.*)"),
    (lambda sd: sd.update({"encoder.head.2.weight": torch.zeros(96, 4, 3, 3, 3)}),
     "vae.pth: 1 key does not match the release layout: encoder.head.2.weight has shape [96, 4, 3, 3, 3]"),
    (lambda sd: sd.update({"decoder.conv1.weight": torch.zeros(6, 48, 3, 3, 3)}),
     "decoder.conv1.weight has shape [6, 48, 3, 3, 3]; expected [C, in, 3, 3, 3] with C a positive multiple of 4"),
])
def test_quantize_refuses_a_broken_vae_before_any_work(tmp_path, edit, needle):
    vae = _vae(tmp_path, edit)
    out = tmp_path / "q"
    assert_cli_error(["quantize", ckpt() / "Lance_3B", "-r", "int8-rtn", "--out", out, "--vae", vae], needle)
    assert not out.exists() and not (tmp_path / "q.job").exists()


def test_golden_inputs_stay_accepted(tmp_path):
    code, err, exc = run_cli(["memory-plan", "--model", ckpt(), "--task", "x2t_image", "--gpu-memory", "16GiB"])
    assert (code, exc) == (0, None), err
