"""End-to-end parity with the upstream golden cases, through the public API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from golden_data import assert_close, assert_uint8_close, golden_root, load_case
from golden_requests import GENERATION_CASES, UNDERSTANDING_CASES, request_from_case, run_args


def _model_dir(meta) -> str:
    return str(golden_root() / "ckpt" / meta["checkpoint"])


@pytest.fixture(scope="module")
def pipelines():
    from lance_deploy.pipeline.pipeline import LancePipeline

    cache = {}

    def get(meta):
        key = (meta["task"], meta["checkpoint"])
        if key not in cache:
            cache[key] = LancePipeline.from_path(_model_dir(meta), meta["task"], device="cpu", dtype="float32")
        return cache[key]

    return get


@pytest.mark.parametrize("case", GENERATION_CASES)
def test_generation_matches_upstream(case, pipelines):
    meta, g = load_case(case)
    out = pipelines(meta)(request_from_case(meta, g), progress=False, trace=True)
    tr = out.trace
    assert_close(tr.v_cond[0], g["v_cond"][0], "v_cond[0]")
    if len(g["v_uncond"]):
        assert_close(tr.v_uncond[0], g["v_uncond"][0], "v_uncond[0]")
    assert_close(torch.stack(tr.v_guided), g["v_guided"], "v_guided")
    for i, lat in enumerate(out.latents):
        assert_close(lat, g[f"final_latent_{i}"], f"final_latent_{i}")
    assert_uint8_close(out.frames, g["decoded_uint8"], "decoded_uint8")


@pytest.mark.parametrize("case", UNDERSTANDING_CASES)
def test_understanding_matches_upstream(case, pipelines):
    meta, g = load_case(case)
    out = pipelines(meta)(request_from_case(meta, g), progress=False)
    assert out.token_ids == g["generated_ids"].tolist()
    assert_close(torch.stack(out.logits), g["logits_steps"][: len(out.logits)], "logits_steps")


@pytest.mark.parametrize("case", GENERATION_CASES + UNDERSTANDING_CASES)
def test_run_cli_matches_upstream(case, tmp_path):
    from safetensors.torch import load_file

    from lance_deploy.cli import cli

    meta, g = load_case(case)
    args = ["run"] + run_args(meta, g, tmp_path) + ["--model", _model_dir(meta), "--json"]
    if meta["task"] in GENERATION_CASES:
        args += ["--out", str(tmp_path / ("out.png" if meta["task"] in ("t2i", "image_edit") else "out.mp4"))]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    if meta["task"] in UNDERSTANDING_CASES:
        assert summary["token_ids"] == g["generated_ids"].tolist()
        return
    latents = load_file(str(tmp_path / "latents.safetensors"))
    for name, tensor in latents.items():
        assert_close(tensor, g[name], name)
    assert summary["output"].endswith(("png", "mp4"))
