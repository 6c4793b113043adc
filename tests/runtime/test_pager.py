"""Layer streaming and phase residency: paged == resident bit for bit, the ledger, the run path.

Runs on the tiny golden checkpoint in fp32 on CPU (the pager's CPU path: same slots, views and
ledger, synchronous copies); the `gpu` test checks prefetch overlap and device peaks on CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from golden_data import golden_root, load_case
from golden_requests import request_from_case, run_args

LLM_UNITS = ("norms_bridges",)


def _pipe(meta, **kw):
    from lance_deploy.pipeline.pipeline import LancePipeline

    return LancePipeline.from_path(str(golden_root() / "ckpt" / meta["checkpoint"]), meta["task"], device="cpu",
                                   dtype="float32", **kw)


@pytest.fixture(scope="module")
def resident():
    """Resident reference outputs per case (computed once)."""
    cache = {}

    def get(case):
        if case not in cache:
            meta, g = load_case(case)
            cache[case] = _pipe(meta)(request_from_case(meta, g), progress=False, trace=True)
        return cache[case]

    return get


def _count_forwards(pipe) -> list[tuple[str, bool]]:
    """Wrap the backbone's forward to record, per call, the phase and whether the gen expert ran."""
    bb = pipe.c.lm.language_model.model
    seen, inner = [], bb.forward

    def forward(x, cos_sin, routing, cache, **kw):
        seen.append((pipe.phase, routing.is_mixed))
        return inner(x, cos_sin, routing, cache, **kw)

    bb.forward = forward
    return seen


def _spans(task, stream, markers=None):
    """The spans of `task` (the planner's phases) with `stream` in each LLM phase."""
    from lance_deploy.runtime.residency import Span

    x2t = task.startswith("x2t")
    out = [Span("encode_vit", ("vit",))] if x2t or task == "image_edit" else []
    out += [Span("encode_vae", ("vae_encoder",))] if task == "image_edit" else []
    for name in ("prefill", "text_decode") if x2t else ("prefill", "denoise"):
        units = LLM_UNITS + (("lm_head",) if name == "text_decode" else ())
        out.append(Span(name, units, dict(stream), markers if name == "denoise" else None))
    return out + ([] if x2t else [Span("vae_decode", ("vae_decoder",))])


def _expected_llm_bytes(res, spans, forwards) -> int:
    """What the plan counts over the LLM phases: each span places the units the previous one did
    not hold, then every forward copies each streamed layer of each expert it runs."""
    total, held = 0, set()
    for span in spans:
        resident, stream = res.layer_units(span)
        want = {u for u in list(span.units) + resident if u in res.units}
        total += sum(res.unit_bytes(u) for u in want - held)
        held = want
        per = {e: sum(res.unit_bytes(f"{e}.{i}") for i in layers) for e, layers in stream.items()}
        total += sum(per.get("und", 0) + (per.get("gen", 0) if mixed else 0)
                     for phase, mixed in forwards if phase == span.name)
    return total


def _llm_spans(pipe):
    return [s for n, s in pipe.spans.items() if n in ("prefill", "denoise", "text_decode")]


STREAMS = {"und_only": {"und": 2, "gen": 0}, "und1_gen1": {"und": 1, "gen": 1}, "all": {"und": 2, "gen": 2}}


@pytest.mark.parametrize("case", ["t2i", "image_edit"])
@pytest.mark.parametrize("config", list(STREAMS))
def test_paged_generation_is_bit_identical(case, config, resident):
    meta, g = load_case(case)
    ref = resident(case)
    pipe = _pipe(meta)
    stream = STREAMS[config]
    res = pipe.attach_residency(_spans(case, stream))
    assert res.n_layers == 2  # the tiny model: "all" streams every layer of both experts
    forwards = _count_forwards(pipe)
    out = pipe(request_from_case(meta, g), progress=False, trace=True)
    assert g["noise"].shape[0] > 0 and len(out.latents) == len(ref.latents)
    for a, b in zip(out.latents, ref.latents):
        assert torch.equal(a, b)
    assert torch.equal(torch.stack(out.trace.v_guided), torch.stack(ref.trace.v_guided))
    assert (out.frames == ref.frames).all()
    if case == "t2i":
        assert len(ref.trace.v_uncond) > 0  # CFG ran
    # exactly the bytes expected moved: each span's new resident units once + the streamed layers per forward
    led, spans = res.ledger, _llm_spans(pipe)
    assert sum(led.phase_moved.get(s.name, 0) for s in spans) == _expected_llm_bytes(res, spans, forwards)
    assert any(mixed for phase, mixed in forwards if phase == "denoise")  # the queries ran the gen expert
    for s in spans:
        assert led.phase_peak[s.name] <= res.span_bytes(s)
    assert led.phase_peak["denoise"] == res.span_bytes(pipe.spans["denoise"])
    assert led.phase_moved["vae_decode"] == res.unit_bytes("vae_decoder")


@pytest.mark.parametrize("k", [1, 2])
def test_paged_understanding_is_bit_identical(k, resident):
    meta, g = load_case("x2t_image")
    ref = resident("x2t_image")
    pipe = _pipe(meta)
    res = pipe.attach_residency(_spans("x2t_image", {"und": k}))
    forwards = _count_forwards(pipe)
    out = pipe(request_from_case(meta, g), progress=False)
    assert out.token_ids == ref.token_ids
    assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits))
    assert not any(mixed for _, mixed in forwards)  # x2t: und only; no gen expert is loaded
    spans = _llm_spans(pipe)
    assert sum(res.ledger.phase_moved.get(s.name, 0) for s in spans) == _expected_llm_bytes(res, spans, forwards)


STEPS = {"t2i": [{"und": 1, "gen": 0}, {"und": 2, "gen": 0}, {"und": 2, "gen": 1}, {"und": 2, "gen": 2}],
         "x2t_image": [{"und": 1}, {"und": 2}]}


@pytest.mark.parametrize("case", ["t2i", "x2t_image"])
def test_ledger_never_exceeds_budget(case, resident):
    """Streaming 1..all layers under a budget of exactly what the span needs: every phase runs
    within it (the ledger raises before going over), one byte less is refused, outputs identical.
    (On the 2-layer tiny model streaming saves nothing, so the budgets follow the configuration.)"""
    from lance_deploy.runtime.pager import BudgetExceeded

    meta, g = load_case(case)
    ref = resident(case)
    for stream in STEPS[case]:
        pipe = _pipe(meta)
        res = pipe.attach_residency(_spans(case, stream))
        res.ledger.budget = max(res.span_bytes(s) for s in pipe.spans.values())
        for name, span in pipe.spans.items():  # each phase held to exactly what its span needs
            res.ledger.phase_budgets[name] = res.span_bytes(span)
        out = pipe(request_from_case(meta, g), progress=False)
        led = res.ledger
        assert led.peak <= led.budget
        assert set(led.phase_peak) >= set(pipe.spans)
        for name, span in pipe.spans.items():
            assert led.phase_peak[name] <= res.span_bytes(span)
        if case == "t2i":
            assert all(torch.equal(a, b) for a, b in zip(out.latents, ref.latents))
        else:
            assert out.token_ids == ref.token_ids
        res.park_all()
        assert res.ledger.current == 0
        span = pipe.spans["prefill"]
        res.ledger.phase_budgets["prefill"] = res.span_bytes(span) - 1
        with pytest.raises(BudgetExceeded):
            res.enter(span)
        assert res.ledger.current < res.span_bytes(span)


def test_widen_streams_until_the_span_fits():
    from lance_deploy.runtime.residency import Span, widen

    meta, _ = load_case("t2i")
    pipe = _pipe(meta)
    res = pipe.attach_residency([])
    start = Span("denoise", LLM_UNITS, {"und": 0, "gen": 0})
    # on the 2-layer tiny model two slots cost as much as the layers, so below the resident
    # size widen ends at every layer streamed (and the ledger then refuses the span)
    picked = widen(start, res, res.span_bytes(start) - 1)
    assert picked.stream == {"und": 2, "gen": 2}
    assert widen(start, res, res.span_bytes(start)) == start
    assert widen(start, res, 1 << 40) == start  # enough room: nothing streams


def test_default_backbone_has_no_pager():
    from lance_deploy.model.mot import Backbone

    assert Backbone.pager is None


def test_run_gpu_memory_plans_and_matches(tmp_path):
    """`run --gpu-memory` goes through the planner; on the tiny model everything fits, so no
    pager is attached and the output equals the plain run's."""
    from safetensors.torch import load_file

    from lance_deploy.cli import cli

    meta, g = load_case("t2i")
    model = str(golden_root() / "ckpt" / meta["checkpoint"])
    outs = []
    for extra in ([], ["--gpu-memory", "4GiB"]):
        d = tmp_path / str(len(outs))
        d.mkdir()
        args = ["run"] + run_args(meta, g, d) + ["--model", model, "--json", "--out", str(d / "o.png")] + extra
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        json.loads(r.stdout)
        outs.append(load_file(str(d / "latents.safetensors")))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_run_gpu_memory_too_small_refuses(tmp_path):
    from lance_deploy.cli import cli

    meta, g = load_case("t2i")
    model = str(golden_root() / "ckpt" / meta["checkpoint"])
    args = ["run"] + run_args(meta, g, tmp_path) + ["--model", model, "--gpu-memory", "1MiB"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "--gpu-memory" in r.output, r.output


def test_oom_becomes_one_line_naming_the_phase(tmp_path, monkeypatch):
    from lance_deploy.cli import cli
    from lance_deploy.pipeline.pipeline import LancePipeline

    def boom(self, req, **kw):
        self.phase = "denoise"
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 8.00 GiB of which 1.50 GiB is free.\nmore details")

    monkeypatch.setattr(LancePipeline, "__call__", boom)
    meta, g = load_case("t2i")
    model = str(golden_root() / "ckpt" / meta["checkpoint"])
    r = CliRunner().invoke(cli, ["run"] + run_args(meta, g, tmp_path) + ["--model", model])
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("Error")]
    assert len(lines) == 1 and "denoise" in lines[0] and "--gpu-memory" in lines[0], r.output
    assert "Traceback" not in r.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefetch_overlaps_and_peak_within_plan():
    """On CUDA: paged == resident bit for bit, the next layer's copy is issued on the side stream
    before the current layer computes, and max_memory_allocated stays within the ledger's span
    plus the activations of the tiny run."""
    from lance_deploy.pipeline.pipeline import LancePipeline

    meta, g = load_case("t2i")
    path = str(golden_root() / "ckpt" / meta["checkpoint"])
    ref = LancePipeline.from_path(path, "t2i", device="cuda", dtype="float32")
    want = ref(request_from_case(meta, g), progress=False)
    del ref
    torch.cuda.empty_cache()
    pipe = LancePipeline.from_path(path, "t2i", device="cpu", dtype="float32")
    pipe.device = torch.device("cuda")
    res = pipe.attach_residency(_spans("t2i", {"und": 2, "gen": 2}))
    events = []
    from lance_deploy.runtime import pager as pager_mod

    load = pager_mod.LayerPager._load

    def traced(self, i, e):
        events.append((i, e, torch.cuda.current_stream() != self.side))
        return load(self, i, e)

    pager_mod.LayerPager._load = traced
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = pipe(request_from_case(meta, g), progress=False)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        pager_mod.LayerPager._load = load
    assert all(torch.equal(a, b) for a, b in zip(out.latents, want.latents))
    assert res.pager is None or res.pager.side is not None
    # layer 1 of each forward was loaded while layer 0 was being computed (a prefetch)
    assert any(i == 1 for i, _, _ in events)
    assert peak <= res.ledger.peak + (64 << 20), (peak, res.ledger.peak)
