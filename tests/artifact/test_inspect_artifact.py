"""`lance-deploy inspect` on artifacts (formats, bytes, sha256 state per shard) and exit 2 on problems."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli
from lance_deploy.quant.quantize import quantize
from lance_deploy.quant.recipe import load_recipe


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "art"
    quantize(golden_root() / "ckpt" / "Lance_3B", load_recipe("int8-rtn"), out, progress=False)
    return out


def _inspect(*args):
    res = CliRunner().invoke(cli, ["inspect", *map(str, args)])
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_artifact_report(artifact):
    res = _inspect(artifact)
    assert res.exit_code == 0, res.stderr
    assert "(artifact: recipe int8-rtn" in res.stdout
    assert any(line.split()[:1] == ["gen_expert"] and "int8 x14" in line for line in res.stdout.splitlines())
    assert res.stdout.count("sha256 ok") == 5  # shared, und, gen, vit, vae shards
    data = json.loads(_inspect(artifact, "--json").stdout)
    assert data["recipe"] == "int8-rtn" and data["problems"] == []
    assert data["components"]["und_expert"]["formats"] == {"bf16": 15, "int8": 14}
    assert {s["checksum"] for s in data["shards"].values()} == {"sha256 ok"}
    total = sum(c["bytes"] for c in data["components"].values())
    assert total == data["total"]["bytes"] == sum(s["bytes"] for s in data["shards"].values())


def test_corrupt_shard_is_named_and_exits_2(artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    shard = bad / "weights" / "gen-000-001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    for extra in ((), ("--json",)):
        res = _inspect(bad, *extra)
        assert res.exit_code == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: 1 problem(s) found (see the report); first: "
                                                       "weights/gen-000-001.safetensors: tensor ")
        assert "fails its sha256 check" in lines[0]
    shards = json.loads(res.stdout)["shards"]
    assert shards["weights/gen-000-001.safetensors"]["checksum"] == "FAILED"
    assert shards["weights/und-000-001.safetensors"]["checksum"] == "sha256 ok"  # the others still shown intact
    res = _inspect(bad, "--no-verify")
    assert res.exit_code == 0 and "not checked" in res.stdout


def test_unsealed_partial_is_refused(artifact, tmp_path):
    partial = tmp_path / "art.partial"
    shutil.copytree(artifact, partial)
    res = _inspect(partial)
    assert res.exit_code == 2
    assert res.stderr.strip() == f"Error: {partial}: an unsealed (partial) artifact; the run that wrote it did not finish"


def test_checkpoint_with_problems_exits_2(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "Lance_3B"
    shutil.copytree(golden_root() / "ckpt" / "Lance_3B", model)
    sd = load_file(str(model / "model.safetensors"))
    sd.pop("language_model.model.layers.1.mlp_moe_gen.up_proj.weight")
    save_file(sd, str(model / "model.safetensors"))
    res = _inspect(model, "--vae", golden_root() / "ckpt" / "Wan2.2_VAE.pth")
    assert res.exit_code == 2
    assert "problem: " in res.stdout  # the report is still printed
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {model}: 1 problem(s) found")
    assert "layers.1.mlp_moe_gen.up_proj.weight" in lines[0]
    assert _inspect(golden_root() / "ckpt" / "Lance_3B").exit_code == 0  # the intact one has none
