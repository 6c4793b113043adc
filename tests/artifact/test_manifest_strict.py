"""A quantized artifact is read only as the writer wrote it: a strict manifest (types, formats,
key table, unique records, hashed files), no symlinks, and no read outside its folder."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from input_cases import assert_cli_error, ckpt, quantized_artifact

from lance_deploy.artifact.manifest import ArtifactError
from lance_deploy.artifact.reader import ArtifactReader
from lance_deploy.core.errors import CheckpointError
from lance_deploy.pipeline.tasks import SPECS


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> Path:
    return quantized_artifact(tmp_path_factory.mktemp("sealed") / "q")


@pytest.fixture
def art(sealed, tmp_path) -> Path:
    out = tmp_path / "q"
    shutil.copytree(sealed, out)
    return out


def _edit(art: Path, fn) -> dict:
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    (art / "manifest.json").write_text(json.dumps(m))
    return m


def _refused(art: Path) -> str:
    with pytest.raises(ArtifactError) as e:
        ArtifactReader(art)
    assert "\n" not in str(e.value)
    return str(e.value)


def _index(m: dict, name: str) -> int:
    return next(i for i, t in enumerate(m["tensors"]) if t["name"] == name)


def _plain(m):  # a plain bf16 tensor the writer stored
    return _index(m, "embed_tokens")


def _packed(m):
    return _index(m, "blk.0.und.attn_q")


# --- 4. strict schema ------------------------------------------------------------------------------

CASES = {
    "schema true": (lambda m: m.update(schema_version=True), "schema_version True not supported"),
    "plain format": (lambda m: m["tensors"][_plain(m)].update(format="int8"),
                     "tensors[{p}] (embed_tokens).format: a plain tensor's format is its dtype ('bf16'), got 'int8'"),
    "packed format": (lambda m: m["tensors"][_packed(m)].update(format="int4"),
                      "(blk.0.und.attn_q).format: 'int4' is not its spec's format 'int8'"),
    "field layout": (lambda m: m["tensors"][_packed(m)]["fields"]["scale"].update(shape=[1, 64], nbytes=256),
                     "(blk.0.und.attn_q).fields.scale: F32[1, 64] does not fit int8 of shape [64, 64] "
                     "(expected F32[64, 1])"),
    "key table": (lambda m: (m["tensors"][_plain(m)].update(shape=[64, 448]),
                             m["tensors"][_plain(m)]["fields"]["tensor"].update(shape=[64, 448])),
                  "1 tensor records do not match the model's key table (from its llm_config.json): "
                  "embed_tokens has shape [64, 448], expected [448, 64]"),
    "duplicate": (lambda m: m["tensors"].append(dict(m["tensors"][0])), "tensors[0] and tensors[{n}] both name"),
    "unknown key": (lambda m: m["tensors"][3].update(note="x"), "tensors[3]: unknown field 'note'"),
    "extra group": (lambda m: m["groups"].append({**m["groups"][0], "name": "spare",
                                                 "shard": "weights/spare.safetensors"}),
                    "groups[{g}] (spare): holds no tensor"),
    "files list": (lambda m: m.update(files=list(m["files"])),
                   "files: expected an object mapping each copied file to its sha256, got ['llm_config.json'"),
    "sha256": (lambda m: m["files"].update({"llm_config.json": "abc"}),
               "files.llm_config.json: expected a sha256 (64 lower-case hex digits), got 'abc'"),
    "outside": (lambda m: m["files"].update({"../llm_config.json": "0" * 64}),
                "files.../llm_config.json: path '../llm_config.json' is not normalised or leaves the artifact"),
    "nesting": (lambda m: m["quality"].update(x=json.loads("[" * 40 + "]" * 40)), "JSON nested deeper than 32 levels"),
    "producer": (lambda m: m["producer"].update(name="someone"), "producer.name: 'someone' not allowed"),
    "nbytes": (lambda m: m["tensors"][_plain(m)]["fields"]["tensor"].update(nbytes=7),
               "fields.tensor.nbytes: BF16[448, 64] is 57344 bytes, got 7"),
}


@pytest.mark.parametrize("case", CASES)
def test_manifest_is_strict(art, case):
    fn, needle = CASES[case]
    m = _edit(art, fn)
    msg = _refused(art)
    assert msg.startswith(f"{art / 'manifest.json'}: "), msg
    needle = needle.format(p=_plain(m) if case == "plain format" else 0, n=len(m["tensors"]) - 1,
                           g=len(m["groups"]) - 1)
    assert needle in msg, (needle, msg)


def test_duplicate_json_key_is_refused(art):
    text = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(text.replace('"quality": {}', '"quality": {"a": 1, "a": 2}', 1))
    assert "duplicate key 'a' in one JSON object" in _refused(art)


def test_memory_plan_refuses_a_shard_that_is_config_json(art):
    _edit(art, lambda m: m["groups"][0].update(shard="llm_config.json"))
    assert_cli_error(["memory-plan", "--model", art, "--task", "t2i", "--gpu-memory", "16GiB"],
                     "groups[0].shard: expected 'weights/shared.safetensors', got 'llm_config.json'")
    _edit(art, lambda m: (m["groups"][0].update(shard="weights/shared.safetensors"),
                          m["tensors"][0].update(shard="config.json")))
    assert_cli_error(["memory-plan", "--model", art, "--task", "t2i", "--gpu-memory", "16GiB"],
                     "tensors[0] (embed_tokens).shard: 'config.json' is not its group's shard")


def test_the_writer_output_is_accepted(sealed):
    with ArtifactReader(sealed) as r:
        r.verify()
        assert set(r.manifest.files) >= {"llm_config.json", "tokenizer.json"}
        assert all(len(h) == 64 for h in r.manifest.files.values())


# --- 5. reads stay inside the artifact ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["manifest.json", "llm_config.json", "weights/vae.safetensors"])
def test_any_symlink_in_the_artifact_is_refused(art, tmp_path, name):
    outside = tmp_path / "outside"
    shutil.copyfile(art / name, outside)
    (art / name).unlink()
    os.symlink(outside, art / name)
    assert _refused(art) == (f"{art.resolve() / name}: is a symlink; an artifact holds only its own files, so a "
                             "link (which could point outside the folder) is refused")


def test_a_copied_file_is_hash_checked(art):
    (art / "tokenizer.json").write_text((art / "tokenizer.json").read_text().replace('"<|im_end|>"', '"<|im_fin|>"'))
    assert_cli_error(["memory-plan", "--model", art, "--task", "t2i", "--gpu-memory", "16GiB"],
                     f"{art / 'tokenizer.json'}: fails its sha256 check against manifest.json")


def test_no_path_outside_the_artifact_is_opened(art, tmp_path, monkeypatch):
    from lance_deploy.pipeline.components import load_artifact_components

    opened: list[Path] = []
    real = {"builtins": builtins.open, "io": io.open, "os": os.open}

    def hook(kind):
        def call(file, *a, **k):
            if isinstance(file, (str, os.PathLike)):
                opened.append(Path(os.path.abspath(file)))
            return real[kind](file, *a, **k)
        return call

    monkeypatch.setattr(builtins, "open", hook("builtins"))
    monkeypatch.setattr(io, "open", hook("io"))
    monkeypatch.setattr(os, "open", hook("os"))
    c = load_artifact_components(art, SPECS["t2i"], dtype=torch.float32, device="cpu")
    assert c.vae is not None and c.tokenizer.im_end
    assert_cli_error(["memory-plan", "--model", art, "--task", "t2i", "--gpu-memory", "1KiB"], "")  # does not fit
    watched = [p for p in opened if p.is_relative_to(tmp_path) or p.is_relative_to(ckpt().parent)]
    outside = [p for p in watched if not p.is_relative_to(art.resolve())]
    assert not outside, outside
    names = {p.relative_to(art.resolve()).as_posix() for p in watched}
    assert {"manifest.json", "llm_config.json", "tokenizer.json", "weights/vae.safetensors"} <= names, names


# --- 6. the artifact loader loads only the VAE parts a task uses ----------------------------------------

def test_t2i_needs_only_the_vae_decoder(art):
    from lance_deploy.artifact.load import load_artifact_vae
    from lance_deploy.pipeline.components import load_artifact_components

    def drop_encoder(m):
        m["tensors"] = [t for t in m["tensors"] if not t["name"].startswith(("vae.encoder.", "vae.conv1."))]
        spans = [(f["offset"], f["offset"] + f["nbytes"]) for t in m["tensors"] if t["group"] == "vae"
                 for f in t["fields"].values()]
        g = next(g for g in m["groups"] if g["name"] == "vae")
        g.update(data_offset=min(s for s, _ in spans), nbytes=max(e for _, e in spans) - min(s for s, _ in spans))

    _edit(art, drop_encoder)
    c = load_artifact_components(art, SPECS["t2i"], dtype=torch.float32, device="cpu", verify=True)
    assert c.vae.decoder.conv1.weight.shape[1] == 48 and c.vae.encoder.conv1.weight.is_meta
    with ArtifactReader(art) as r, pytest.raises(CheckpointError) as e:
        load_artifact_vae(r, ("encoder",), torch.float32, "cpu")
    assert str(e.value) == (f"{art}: the artifact's vae.* tensors: no VAE encoder tensors (encoder.*); expected the "
                            "Wan2.2 VAE state dict")
