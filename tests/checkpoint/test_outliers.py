"""`make-checkpoint --outliers`: planted outlier channels that do not change what the model computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lance_deploy.checkpoint.make import make_checkpoint
from lance_deploy.checkpoint.names import expected_lance_shapes
from lance_deploy.checkpoint.outliers import (
    RECORD_FILE,
    OutlierPlan,
    norm_read_by,
    readers_by_norm,
)
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.cli import cli
from lance_deploy.config import FULL_LLM, TINY_LLM
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest

SEED = 3


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("outliers")
    plain = make_checkpoint(root / "plain", "tiny", seed=SEED, progress=False)
    planted = make_checkpoint(root / "planted", "tiny", seed=SEED, progress=False, outliers=True)
    return plain, planted


def _tensors(path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as r:
        return {k: r.read(k) for k in r.infos()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm())


@pytest.mark.parametrize("cfg,count", [(TINY_LLM, 4), (FULL_LLM, 8)])
def test_every_norm_and_reader_is_covered(cfg, count):
    """Both sizes: 4 norms per layer + 2 final norms, each with all its readers; channels deterministic."""
    keys = expected_lance_shapes(cfg, "video")
    norms = readers_by_norm(keys)
    assert len(norms) == 4 * cfg.num_hidden_layers + 2
    assert all(n in keys for n in norms)
    sizes = sorted({len(r) for r in norms.values()})
    assert sizes == [1, 2, 3]  # final norms -> lm_head / llm2vae; mlp -> gate, up; attn -> q, k, v
    assert norm_read_by("vit_model.blocks.0.attn.qkv.weight") is None  # the ViT is left alone
    plan = OutlierPlan.for_config(cfg, count, seed=1, tag="video")
    chans = {n: plan.channels(n) for n in norms}
    assert all(len(c) == count and len(set(c)) == count and max(c) < cfg.hidden_size for c in chans.values())
    assert len(set(chans.values())) > 1  # channels differ across layers / experts
    assert chans == {n: OutlierPlan.for_config(cfg, count, seed=1, tag="video").channels(n) for n in norms}


def test_apply_is_pure_per_key():
    plan = OutlierPlan(64, 4, seed=2, tag="image")
    w = torch.randn(128, 64)
    key = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
    out = plan.apply(key, w)
    assert not torch.equal(out, w) and torch.equal(plan.apply(key, w), out)  # input untouched, same result
    assert torch.equal(plan.apply(key, w.clone(), inplace=True), out)
    other = "language_model.model.layers.1.self_attn.o_proj.weight"  # reads attention output, not a norm
    assert plan.apply(other, w) is w


def test_plan_validation():
    with pytest.raises(LanceUsageError, match="factor"):
        OutlierPlan(64, 4, factor=1.0)
    with pytest.raises(LanceUsageError, match="count"):
        OutlierPlan(64, 0)


def test_stored_values_are_the_reparameterisation(ckpts):
    """Only planted norms and their readers differ, by exactly x30 / /30 on the recorded channels."""
    plain, planted = ckpts
    rec = read_record(planted / "Lance_3B")
    assert read_record(plain / "Lance_3B") is None and rec["factor"] == 30.0 and rec["seed"] == SEED
    a, b = _tensors(plain / "Lance_3B/model.safetensors"), _tensors(planted / "Lance_3B/model.safetensors")
    touched = set(rec["norms"]) | {r for n in rec["norms"].values() for r in n["readers"]}
    assert [k for k in a if not torch.equal(a[k], b[k])] == sorted(touched, key=list(a).index)
    for norm, entry in rec["norms"].items():
        ch = entry["channels"]
        torch.testing.assert_close(b[norm][ch], a[norm][ch] * 30)
        for reader in entry["readers"]:
            torch.testing.assert_close(b[reader][:, ch], a[reader][:, ch] / 30)
    assert read_record(planted / "Lance_3B_Video")["tag"] == "video"


def _t2i_latent(ckpt, noise):
    pipe = LancePipeline.from_path(ckpt / "Lance_3B", "t2i", device="cpu", dtype="float32")
    req = TaskRequest(task="t2i", prompt="three red apples on a wooden table", height=64, width=64,
                      sampler=SamplerConfig(steps=4), init_noise=noise)  # default CFG 4: both branches run
    return pipe(req, progress=False).latents[-1]


def test_t2i_latents_unchanged(ckpts):
    noise = torch.randn(16, 48, generator=torch.Generator().manual_seed(0))  # 64x64 px -> 4x4 latent tokens
    ref, out = (_t2i_latent(c, noise) for c in ckpts)
    assert _rel(ref, out) <= 1e-5


def test_x2t_image_logits_unchanged(ckpts):
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    runs = []
    for ckpt in ckpts:
        pipe = LancePipeline.from_path(ckpt / "Lance_3B", "x2t_image", device="cpu", dtype="float32")
        res = pipe(TaskRequest(task="x2t_image", question="What is shown?", image=image, max_new_tokens=4),
                   progress=False)
        runs.append((res.token_ids, torch.stack([torch.as_tensor(x).float() for x in res.logits])))
    (ids_a, logits_a), (ids_b, logits_b) = runs
    assert ids_a == ids_b and _rel(logits_a, logits_b) <= 1e-5


def _q_proj_channel_means(ckpt) -> torch.Tensor:
    """Mean |input| per hidden channel of layer 0's und q_proj over one t2i run's text tokens."""
    pipe = LancePipeline.from_path(ckpt / "Lance_3B", "t2i", device="cpu", dtype="float32")
    seen = []
    hook = pipe.c.lm.language_model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).abs()))
    try:
        pipe(TaskRequest(task="t2i", prompt="a neon sign that says OPEN", height=32, width=32,
                         sampler=SamplerConfig(steps=1)), progress=False)
    finally:
        hook.remove()
    return torch.cat(seen).mean(0)


def test_planted_channels_are_outliers(ckpts):
    plain, planted = ckpts
    means = _q_proj_channel_means(planted)
    ch = read_record(planted / "Lance_3B")["norms"]["language_model.model.layers.0.input_layernorm.weight"]["channels"]
    assert bool((means[ch] >= 10 * means.median()).all()), (means[ch], means.median())
    base = _q_proj_channel_means(plain)  # the plain random model has no such channels
    assert float(base.max() / base.median()) < 10


def test_cli(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["make-checkpoint", "--tiny", str(tmp_path / "c"), "--outliers",
                              "--outlier-factor", "12", "--seed", "5"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "c/Lance_3B/outliers.json").read_text())
    assert rec["factor"] == 12.0 and rec["seed"] == 5 and rec["channels_per_norm"] == 4
    res = runner.invoke(cli, ["make-checkpoint", "--tiny", str(tmp_path / "d"), "--outlier-factor", "12"])
    assert res.exit_code == 2 and "--outliers" in res.output
    res = runner.invoke(cli, ["make-checkpoint", "--tiny", str(tmp_path / "e"), "--outliers",
                              "--outlier-factor", "0.5"])
    assert res.exit_code == 2 and "factor" in res.output and not (tmp_path / "e").exists()


def read_record(model_dir):
    """The planted-outlier record written by `make-checkpoint --outliers`, or None."""
    path = Path(model_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None
