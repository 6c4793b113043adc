"""The denoising marker rows through a compact und copy (`runtime.markers`): its bytes equal the
planner's, it serves only the denoise span, the originals come back, and the output stays close
to the exact one (tiny golden checkpoint, fp32, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from golden_data import golden_root, load_case
from golden_requests import request_from_case
from torch import nn

from lance_deploy.model.tree import expert_of


def _path(meta) -> str:
    return str(golden_root() / "ckpt" / meta["checkpoint"])


def _pipe(meta, **kw):
    from lance_deploy.pipeline.pipeline import LancePipeline

    return LancePipeline.from_path(_path(meta), meta["task"], device="cpu", dtype="float32", **kw)


def _snr_db(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (a - ref).pow(2).mean()))


@pytest.fixture(scope="module")
def exact():
    meta, g = load_case("t2i")
    return _pipe(meta)(request_from_case(meta, g), progress=False)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compact_bytes_equal_the_planners(fmt):
    from lance_deploy.planning.memory_plan import ModelInfo
    from lance_deploy.runtime.markers import MarkerCopy, layer_bytes
    from lance_deploy.runtime.pager import ByteLedger

    meta, _ = load_case("t2i")
    bb = _pipe(meta).c.lm.language_model.model
    inv = ModelInfo.load(_path(meta), "t2i").inventory("t2i", torch.float32)
    assert inv.compact[fmt] == tuple(layer_bytes(layer, fmt) for layer in bb.layers)
    copy = MarkerCopy(bb, range(len(bb.layers)), fmt, "cpu", ByteLedger())
    assert copy.nbytes == sum(inv.compact[fmt]) < inv.components["und_expert"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_marker_copy_serves_only_the_denoise_span(fmt, exact):
    from lance_deploy.runtime.residency import Span

    meta, g = load_case("t2i")
    pipe = _pipe(meta)
    layer = pipe.c.lm.language_model.model.layers[1]
    originals = {n: m for n, m in layer.named_modules() if n and expert_of(n) == "und"}
    spans = [Span("prefill", ("norms_bridges",), {"und": 0, "gen": 0}),
             Span("denoise", ("norms_bridges",), {"und": 2, "gen": 0}, fmt),
             Span("vae_decode", ("vae_decoder",))]
    res = pipe.attach_residency(spans)
    copies = []
    inner = pipe.c.lm.forward_chunk

    def spy(*a, **kw):  # whether the und rows meet the layer's own q_proj, per phase
        copies.append((pipe.phase, layer.self_attn.q_proj is originals["self_attn.q_proj"]))
        return inner(*a, **kw)

    pipe.c.lm.forward_chunk = spy
    out = pipe(request_from_case(meta, g), progress=False)
    assert {p for p, own in copies if not own} == {"denoise"}  # the context prefill stays exact
    # close to the exact run, and not equal to it (the copy was used)
    snr = _snr_db(out.latents[-1], exact.latents[-1])
    assert 40 < snr < float("inf"), snr
    # the denoise span moved the copy and nothing else: the und layers neither stayed nor streamed
    copy = next(iter(res.markers.values()))
    packed = [type(small).__name__ for _, _, _, small in copy.swaps]
    assert packed.count("QLinear") == (14 if fmt == "int8" else 2)  # int4 g128 takes only down_proj (in 128)
    assert res.ledger.phase_moved["denoise"] == copy.nbytes
    assert res.ledger.phase_peak["denoise"] == res.span_bytes(pipe.spans["denoise"])
    # afterwards the layer holds its own modules again, pointing at the host copies
    assert all(dict(layer.named_modules())[n] is m for n, m in originals.items())
    assert isinstance(layer.self_attn.q_proj, nn.Linear) and not copy.attached


def test_planned_marker_copy_runs_end_to_end(exact):
    """A plan whose denoise phase uses the int8 copy: `from_path(memory_plan=...)` loads on the
    host, builds the spans from the plan and runs; the latents stay close to the exact ones."""
    from lance_deploy.planning.request import plan_residency

    meta, g = load_case("t2i")
    req = request_from_case(meta, g)
    mp = plan_residency(_path(meta), req, 1 << 30, torch.float32)
    assert not mp.needs_streaming()
    phases = [dataclasses.replace(p, markers="int8", marker_layers=2) if p.name == "denoise" else p
              for p in mp.plan.phases]
    mp = dataclasses.replace(mp, plan=dataclasses.replace(mp.plan, phases=phases))
    assert mp.needs_streaming()
    pipe = _pipe(meta, memory_plan=mp)
    denoise = pipe.spans["denoise"]
    assert denoise.markers == "int8" and pipe.spans["prefill"].markers is None
    assert pipe.residency.marker_layers(denoise) == range(0, 2)
    out = pipe(req, progress=False)
    assert 40 < _snr_db(out.latents[-1], exact.latents[-1]) < float("inf")  # close, and the copy was used
    (copy,) = pipe.residency.markers.values()
    res = pipe.residency  # the t2i prefill ran und only: the gen expert arrives with the denoise span
    gen = sum(res.unit_bytes(f"gen.{i}") for i in range(res.n_layers))
    assert res.ledger.phase_moved["denoise"] == copy.nbytes + gen
    assert res.ledger.phase_moved["prefill"] == sum(res.unit_bytes(u) for u in res.units
                                                     if u.startswith("und.") or u == "norms_bridges")
    assert pipe.residency.ledger.peak <= mp.plan.budget
