"""Calibration a user can plan for: the probe estimate, progress on stderr (bars, --json events,
--quiet), and the two shortcuts that must not change a byte: stopping a reference run after its
last kept step, and replaying a quantized layer with its weights built once."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.calibrate.collect import CollectSettings, Probe, collect_programs
from lance_deploy.calibrate.replay import run_layer
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.layout import discover
from lance_deploy.checkpoint.loader import load_layer
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.cli import cli
from lance_deploy.quant.apply import install, linear_jobs, quantize_layer
from lance_deploy.quant.dequant_once import _Built, weights_built_once
from lance_deploy.quant.estimate import estimate
from lance_deploy.quant.layerwise import _stats_factory
from lance_deploy.quant.plan import resolve_plan
from lance_deploy.quant.recipe import load_recipe

SMALL = CollectSettings(tasks=("t2i",), samples_per_task=2, steps=4, keep_steps=(0, 2), height=32, width=32)


@pytest.fixture(scope="module")
def layout():
    return discover(golden_root() / "ckpt" / "Lance_3B")


@pytest.fixture(scope="module")
def programs(layout):
    seen = []
    progs = collect_programs(layout.model_dir, SMALL, on_probe=seen.append)
    assert len(seen) == 1 and isinstance(seen[0], Probe) and set(seen[0].seconds) == {"t2i"}
    return progs


def test_a_run_stopped_after_its_last_kept_step_records_the_same_program(layout, programs):
    from lance_deploy.calibrate import collect

    real = collect._record

    def whole_run(pipe, req, s, keep):  # no early stop: every step and the VAE decode run
        from lance_deploy.calibrate.record import recording

        with recording(pipe.c.lm, req.task, keep_step=lambda k: k in keep, keep_cache=lambda c: True) as p:
            pipe(req, progress=False)
        return p

    collect._record = whole_run
    try:
        again = collect_programs(layout.model_dir, SMALL)
    finally:
        collect._record = real
    assert len(again) == len(programs) == 2
    for a, b in zip(programs, again):
        assert [(c.cache, c.step, c.update_cache) for c in a.calls] == [(c.cache, c.step, c.update_cache)
                                                                         for c in b.calls]
        assert all(torch.equal(x.x, y.x) and torch.equal(x.pos, y.pos) for x, y in zip(a.calls, b.calls))
    assert {c.step for c in programs[0].calls} == {None, 0, 2}


def test_weights_built_once_replays_bit_identically(layout, programs):
    cfg = layout.config()
    plan = resolve_plan(cn.layout_shapes(layout), load_recipe("budget-8gb"))
    jobs = linear_jobs(e for e in plan.entries if e.packed and cn.layer_of(e.name) == 0 and cn.is_linear_weight(e.name))
    with SafetensorsReader(layout.weights_file) as r:
        layer = load_layer(r, cfg, 0)
    hidden = [[c.x for c in p.calls] for p in programs]
    stats: dict = {}
    from lance_deploy.calibrate.replay import observe

    handles = observe(layer, _stats_factory(layer, jobs, stats, 512))
    run_layer(layer, cfg, programs, hidden, torch.device("cpu"))
    for h in handles:
        h.remove()
    install(layer, quantize_layer(layer, jobs, stats))
    ref = run_layer(layer, cfg, programs, hidden, torch.device("cpu"))
    with weights_built_once(layer):
        assert sum(isinstance(m, _Built) for m in layer.modules()) == len(jobs)  # every int4 Linear
        fast = run_layer(layer, cfg, programs, hidden, torch.device("cpu"))
    assert not any(isinstance(m, _Built) for m in layer.modules())  # restored
    assert all(torch.equal(a, b) for pa, pb in zip(ref, fast) for a, b in zip(pa, pb))


def test_estimate_scales_the_probe(layout, programs):
    plan = resolve_plan(cn.layout_shapes(layout), load_recipe("budget-8gb"))
    jobs = linear_jobs(e for e in plan.entries if e.packed and cn.layer_of(e.name) == 0 and cn.is_linear_weight(e.name))
    probe = Probe({"t2i": 2.0}, programs[:1])
    est = estimate(probe, 32, layout=layout, jobs=jobs)
    assert est.programs == 32 and est.layers == 2 and est.linears == 14
    assert est.calibration_s == pytest.approx(62.0)  # 31 runs still to go at the probe's 2 s
    assert est.layer_s > est.search_s >= 0 and est.total_s == pytest.approx(62.0 + 2 * est.layer_s)
    line = est.line()
    assert "32 calibration programs (1 tasks × 32)" in line and "2 decoder layers × 14 Linears" in line
    only = estimate(probe, 4)  # `calibrate`: no layers to rehearse
    assert only.layers == 0 and "calibration ~6 s more" in only.line()


def _fast_recipe(tmp_path):
    recipe = load_recipe("budget-8gb")
    calib = dataclasses.replace(recipe.calibration, tasks=("t2i",), samples_per_task=2, steps=3,
                                timesteps="all", height=32, width=32)
    path = tmp_path / "fast.yaml"
    path.write_text(recipe.replace(calibration=calib).to_yaml())
    return str(path)


@pytest.mark.slow  # two CLI quantize runs, one calibrated: ~60 s on 2 busy cores
def test_quantize_json_reports_estimate_and_progress_events_and_quiet_is_silent(tmp_path):
    src = str(golden_root() / "ckpt" / "Lance_3B")
    recipe = _fast_recipe(tmp_path)
    res = CliRunner().invoke(cli, ["quantize", src, "--recipe", recipe, "--out", str(tmp_path / "a"), "--device",
                                   "cpu", "--json"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    kinds = {e["event"] for e in events}
    assert "estimate" in kinds, res.stderr
    est = next(e for e in events if e["event"] == "estimate")
    assert est["programs"] == 2 and est["layers"] == 2 and est["total_s"] > 0
    phases = {e["phase"] for e in events if e["event"] == "progress"}
    assert {"calibration runs", "quantize layers"} <= phases, phases
    last = [e for e in events if e["event"] == "progress" and e["phase"] == "quantize layers"][-1]
    assert last["done"] == last["total"] == 2
    json.loads(res.stdout)  # stdout stays one JSON object
    quiet = CliRunner().invoke(cli, ["quantize", src, "--recipe", "int8-rtn", "--out", str(tmp_path / "b"),
                                     "--device", "cpu", "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
