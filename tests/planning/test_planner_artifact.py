"""The memory planner on a quantized artifact folder: manifest bytes vs a real artifact load, the
packed experts against the bf16 release, `plan_residency` and the `memory-plan` command (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.planning.memory_plan import ModelInfo
from lance_deploy.planning.request import plan_memory
from lance_deploy.planning.weights import EXPERTS


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from lance_deploy.quant.quantize import quantize
    from lance_deploy.quant.recipe import load_recipe

    out = tmp_path_factory.mktemp("art") / "int8"
    quantize(golden_root() / "ckpt" / "Lance_3B", load_recipe("int8-rtn"), out, progress=False)
    return out


def test_artifact_weight_bytes_equal_a_real_load(artifact):
    from lance_deploy.formats.qlinear import QLinear
    from lance_deploy.pipeline.pipeline import LancePipeline

    pipe = LancePipeline.from_path(artifact, "t2i", device="cpu", dtype="float32")
    assert any(isinstance(m, QLinear) for m in pipe.c.lm.modules())  # really packed
    allocated = sum(t.numel() * t.element_size() for m in (pipe.c.lm, pipe.c.vae) if m is not None
                    for t in m.state_dict().values() if not t.is_meta)
    mp = plan_memory(artifact, "t2i", 64, 64, gpu_memory="4GiB", dtype="float32")
    assert mp.inventory.total == allocated
    assert "vit" not in mp.inventory.components
    assert mp.to_dict()["weights"] == dict(mp.inventory.components)


def test_int8_artifact_experts_about_half_the_bf16_release(artifact):
    release = ModelInfo.load(golden_root() / "ckpt" / "Lance_3B", "t2i").inventory("t2i", torch.bfloat16)
    art = ModelInfo.load(artifact, "t2i").inventory("t2i", torch.bfloat16)
    for e in EXPERTS:
        ratio = art.components[e] / release.components[e]
        assert 0.45 < ratio < 0.65, (e, ratio)  # int8 + per-channel fp32 scales + bf16 norms
        assert art.num_layers(e) == release.num_layers(e)
    for c in ("embed_tokens", "norms_bridges", "vae_decoder"):  # kept plain: at the load dtype
        assert art.components[c] == release.components[c]


def test_artifact_variant_and_missing_parts(artifact):
    info = ModelInfo.load(artifact, "t2i")
    assert info.variant == "image" and info.packed and info.layout is None
    with pytest.raises(LanceUsageError, match="video model"):
        ModelInfo.load(artifact, "t2v")


def test_plan_residency_accepts_an_artifact(artifact):
    from lance_deploy.planning.request import plan_residency

    req = TaskRequest(task="t2i", prompt="a red boat", height=64, width=64, sampler=SamplerConfig(steps=3))
    mp = plan_residency(artifact, req, "4GiB", torch.bfloat16)
    assert mp.fits


def test_memory_plan_command_on_an_artifact(artifact):
    from lance_deploy.cli import cli

    res = CliRunner().invoke(cli, ["memory-plan", "--model", str(artifact), "--task", "t2i", "--height", "64",
                                   "--width", "64", "--gpu-memory", "4GiB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["fits"] and out["weights"]["und_expert"] > 0


def test_a_weight_only_artifact_adds_no_linear_input_transients(artifact):
    from lance_deploy.formats.qlinear import expert_input_transients
    from lance_deploy.planning.memory_plan import ModelInfo

    assert ModelInfo.load(artifact, "t2i").input_transient() == (0, 0)  # int8-rtn: weight-only, no smooth
    assert expert_input_transients([("und", True, None), ("gen", False, "int8"), ("gen", True, "int8"),
                                    (None, True, "int8")]) == (7, 7)
    assert expert_input_transients([("und", False, "fp8_e4m3"), ("gen", False, None)]) == (5, 0)
