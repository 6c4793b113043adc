"""The quantized artifact folder: write -> read byte-identical, checksums, unsafe paths, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from golden_data import golden_root

from lance_deploy import formats
from lance_deploy.artifact.manifest import ArtifactError
from lance_deploy.artifact.writer import ArtifactReader, ArtifactWriter, TensorDecl, group_of
from lance_deploy.formats import FormatSpec, PackedTensor

SPECS = {
    "blk.0.und.attn_q": FormatSpec("int4", 64),
    "blk.0.und.ffn_down": FormatSpec("int8", activations="dynamic_per_token"),
    "blk.1.und.attn_o": FormatSpec("nf4"),
    "blk.0.gen.attn_q": FormatSpec("fp8_e4m3", activations="dynamic_per_token"),
    "blk.1.gen.ffn_up": FormatSpec("int4", 32, symmetric=True),
    "lm_head": FormatSpec("bf16"),
}


def _tensors() -> dict[str, PackedTensor | torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out: dict[str, PackedTensor | torch.Tensor] = {}
    for name, spec in SPECS.items():
        # TINY_LLM shapes: the reader checks every record against the artifact's llm_config.json
        shape = {"ffn_down": (64, 128), "ffn_up": (128, 64), "lm_head": (448, 64)}.get(name.split(".")[-1], (64, 64))
        p = formats.quantize_rtn(torch.randn(shape, generator=g), spec)
        out[name] = p.with_smooth(torch.rand(shape[1], generator=g) + 0.5) if "ffn_down" in name else p
    out["embed_tokens"] = torch.randn(448, 64, generator=g).bfloat16()
    out["blk.0.und.attn_norm"] = torch.rand(64, generator=g).bfloat16()
    out["vae.decoder.conv1.weight"] = torch.randn(8, 48, 3, 3, 3, generator=g)  # decoder width 2
    return out


def _write(out: Path, values, **kw) -> Path:
    """und-000-001 is declared up front (streamed); the other groups are buffered."""
    w = ArtifactWriter(out, num_layers=2, **kw)
    und = [n for n in values if n.startswith("blk.") and ".und." in n]
    w.declare("und-000-001", [TensorDecl.of(n, values[n]) for n in und])
    for name in reversed(list(values)):  # any order; the manifest is sorted canonically
        w.add(name, values[name])
    w.seal(source={"fingerprint": "f"}, recipe={"name": "t"}, created="2026-01-01T00:00:00+00:00",
           source_dir=golden_root() / "ckpt" / "Lance_3B")
    return out


def _fields(v) -> dict[str, torch.Tensor]:
    return v.tensors() if isinstance(v, PackedTensor) else {"tensor": v}


def _same(a, b) -> bool:
    fa, fb = _fields(a), _fields(b)
    return fa.keys() == fb.keys() and all(
        fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape
        and torch.equal(fa[k].contiguous().view(torch.uint8), fb[k].contiguous().view(torch.uint8)) for k in fa)


def test_group_names():
    assert group_of("blk.13.gen.ffn_up", 12, 36) == ("gen-012-023", "gen", (12, 23))
    assert group_of("blk.35.und.attn_q.bias", 12, 36)[0] == "und-024-035"
    assert group_of("blk.1.und.attn_q", 12, 2)[0] == "und-000-001"
    assert [group_of(n)[0] for n in ("lm_head", "out_norm.gen", "vit.merger.ln_q.weight", "vae.conv1.bias")] == \
        ["shared", "shared", "vit", "vae"]


def test_write_read_round_trip_is_byte_identical(tmp_path):
    values = _tensors()
    out = _write(tmp_path / "a", values)
    assert not (tmp_path / "a.partial").exists()
    assert sorted(p.name for p in (out / "weights").iterdir()) == [
        "gen-000-001.safetensors", "shared.safetensors", "und-000-001.safetensors", "vae.safetensors"]
    assert (out / "llm_config.json").read_bytes() == (golden_root() / "ckpt/Lance_3B/llm_config.json").read_bytes()
    with ArtifactReader(out) as r:
        r.verify()
        assert set(r.names()) == set(values)
        for name, v in values.items():
            assert _same(r.read(name), v), name
        for group in r.group_names():
            assert all(_same(v, values[n]) for n, v in r.read_group(group).items())
        rec = r.record("blk.0.und.ffn_down")
        assert rec.release_name == "language_model.model.layers.0.mlp.down_proj.weight"
        assert set(rec.fields) == {"qdata", "scale", "smooth"} and rec.spec["activations"] == "dynamic_per_token"
    # Same inputs -> same bytes, file by file (what a resumed quantize relies on).
    again = _write(tmp_path / "b", values)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (again / p.relative_to(out)).read_bytes(), p


def test_tampered_shard_fails_checksum_naming_it(tmp_path):
    out = _write(tmp_path / "a", _tensors())
    with ArtifactReader(out) as r:
        rec = r.record("blk.1.gen.ffn_up")
    shard = out / rec.shard
    data = bytearray(shard.read_bytes())
    data[rec.fields["qdata"].offset + 3] ^= 0x10
    shard.write_bytes(bytes(data))
    with ArtifactReader(out) as r, pytest.raises(ArtifactError) as e:
        r.verify()
    assert "weights/gen-000-001.safetensors" in str(e.value) and "blk.1.gen.ffn_up" in str(e.value)
    assert "sha256" in str(e.value)


def _edit_manifest(out: Path, fn) -> None:
    m = json.loads((out / "manifest.json").read_text())
    fn(m)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/passwd", "weights/../../x", "./weights/shared.safetensors"])
def test_manifest_paths_outside_the_folder_are_rejected(tmp_path, bad):
    out = _write(tmp_path / "a", _tensors())
    _edit_manifest(out, lambda m: m["tensors"][0].update(shard=bad))
    with pytest.raises(ArtifactError) as e:
        ArtifactReader(out)
    assert "manifest.json" in str(e.value) and repr(bad) in str(e.value)


def test_symlink_escaping_the_folder_is_rejected(tmp_path):
    out = _write(tmp_path / "a", _tensors())
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(out / "weights/vae.safetensors", outside)
    os.symlink(outside, out / "weights/vae.safetensors")
    with pytest.raises(ArtifactError, match=r"a/weights/vae.safetensors: is a symlink; an artifact holds only its own"):
        ArtifactReader(out)


def test_newer_schema_and_unknown_fields_are_refused(tmp_path):
    out = _write(tmp_path / "a", _tensors())
    _edit_manifest(out, lambda m: m.update(schema_version=3))
    with pytest.raises(ArtifactError, match="schema_version 3 not supported"):
        ArtifactReader(out)
    _edit_manifest(out, lambda m: m.update(schema_version=2, extra=1))
    with pytest.raises(ArtifactError, match="unknown field 'extra'"):
        ArtifactReader(out)


def test_partial_folder_is_never_an_artifact(tmp_path):
    values = _tensors()
    with pytest.raises(RuntimeError), ArtifactWriter(tmp_path / "a", num_layers=2) as w:
        w.add("lm_head", values["lm_head"])
        raise RuntimeError("killed mid-write")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    w = ArtifactWriter(tmp_path / "a", num_layers=2)  # a crash: never sealed, never cleaned
    w.add("lm_head", values["lm_head"])
    w.close_group("shared")
    for path in (tmp_path / "a", tmp_path / "a.partial"):
        with pytest.raises(ArtifactError):
            ArtifactReader(path)
    (tmp_path / "a.partial" / "manifest.json").write_text("{}")  # even with a manifest in it
    with pytest.raises(ArtifactError, match="unsealed"):
        ArtifactReader(tmp_path / "a.partial")
    _write(tmp_path / "a", values)  # the next run clears the leftovers and seals
    ArtifactReader(tmp_path / "a").verify()


def test_existing_artifact_replaced_only_when_asked(tmp_path):
    values = _tensors()
    _write(tmp_path / "a", values)
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        ArtifactWriter(tmp_path / "a")
    _write(tmp_path / "a", {**values, "lm_head": formats.quantize_rtn(torch.ones(448, 64), FormatSpec("int8"))},
           overwrite=True)
    assert ArtifactReader(tmp_path / "a").read("lm_head").spec.name == "int8"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="refusing to replace"):
        ArtifactWriter(tmp_path / "notes", overwrite=True)


def test_declared_groups_refuse_surprises(tmp_path):
    values = _tensors()
    w = ArtifactWriter(tmp_path / "a", num_layers=2)
    w.declare("gen-000-001", [TensorDecl.packed("blk.0.gen.attn_q", SPECS["blk.0.gen.attn_q"], (64, 64)),
                              TensorDecl.packed("blk.1.gen.ffn_up", SPECS["blk.1.gen.ffn_up"], (128, 64))])
    with pytest.raises(ArtifactError, match="not declared"):
        w.add("blk.0.gen.attn_o", values["blk.0.gen.attn_q"])
    with pytest.raises(ArtifactError, match="does not match its declaration"):
        w.add("blk.0.gen.attn_q", values["blk.1.gen.ffn_up"])
    w.add("blk.0.gen.attn_q", values["blk.0.gen.attn_q"])
    with pytest.raises(ArtifactError, match=r"1 declared tensors never added \(first: blk.1.gen.ffn_up\)"):
        w.seal(source={}, recipe={})
    w.abort()
    assert not (tmp_path / "a.partial").exists()


def test_plan_declared_artifact_from_golden_weights(tmp_path):
    """The quantizer's flow in miniature: declare the plan, stream RTN-packed golden weights, seal.
    Every stored tensor's bytes equal the plan's projection."""
    from lance_deploy.checkpoint import canonical as cn
    from lance_deploy.checkpoint.layout import discover
    from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
    from lance_deploy.quant.plan import resolve_plan
    from lance_deploy.quant.recipe import load_recipe

    layout = discover(golden_root() / "ckpt" / "Lance_3B")
    with SafetensorsReader(layout.weights_file) as r:
        shapes = cn.canonical_shapes({k: i.shape for k, i in r.infos().items()})
        plan = resolve_plan(shapes, load_recipe("budget-8gb"))
        w = ArtifactWriter(tmp_path / "q", num_layers=2)
        assert w.declare_plan(plan.entries) == ["shared", "und-000-001", "gen-000-001"]
        for e in (e for e in plan.entries if e.format != "skip"):
            t = r.read(cn.to_release(e.name))
            if e.packed:
                p = formats.quantize_rtn(t, e.spec())
                w.add(e.name, p.with_smooth(torch.ones(e.shape[1])) if e.smooth else p)
            else:
                w.add(e.name, t.bfloat16())
    w.seal(source={}, recipe=plan.recipe.to_dict(), source_dir=layout.model_dir)
    with ArtifactReader(tmp_path / "q") as a:
        a.verify()
        for e in plan.entries:
            if e.format != "skip":
                assert a.record(e.name).nbytes == e.bytes, e.name
        assert a.record("blk.1.gen.ffn_down").spec["group_size"] == 64
