"""Layer-by-layer replay of recorded programs reproduces the full model exactly."""

from __future__ import annotations

import torch
from golden_data import golden_root

from lance_deploy.calibrate.record import recording, stratified_steps
from lance_deploy.calibrate.replay import run_layer
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest


def _final(lm, h, call):
    """What forward_chunk returns: the expert-routed final norm of the last layer's output."""
    from lance_deploy.model.mot import Routing, route

    routing = Routing.of(h.shape[0], call.gen_rows)
    m = lm.language_model.model
    return route(h, routing, m.norm, lambda r: m.norm_moe_gen(r))


def test_replay_matches_full_forward():
    pipe = LancePipeline.from_path(golden_root() / "ckpt" / "Lance_3B", "t2i", device="cpu", dtype="float32")
    lm = pipe.c.lm
    outputs = []
    original = lm.forward_chunk

    req = TaskRequest(task="t2i", prompt="a cat on a mat", height=32, width=32, sampler=SamplerConfig(steps=3))
    with recording(lm, "t2i") as program:
        inner = lm.forward_chunk

        def spy(*a, **k):
            out = inner(*a, **k)
            outputs.append(out.detach().clone())
            return out

        lm.forward_chunk = spy
        pipe(req, progress=False)
        lm.forward_chunk = inner
    assert lm.forward_chunk.__func__ is original.__func__
    steps = {c.step for c in program.calls if c.step is not None}
    assert steps == {0, 1, 2}
    assert {c.cache for c in program.calls} == {0, 1}

    hidden = [[c.x for c in program.calls]]
    for layer in lm.language_model.model.layers:
        hidden = run_layer(layer, lm.cfg, [program], hidden, torch.device("cpu"))
    for call, h, ref in zip(program.calls, hidden[0], outputs):
        torch.testing.assert_close(_final(lm, h, call), ref, rtol=0, atol=1e-6)


def test_recording_keeps_only_selected_steps():
    pipe = LancePipeline.from_path(golden_root() / "ckpt" / "Lance_3B", "t2i", device="cpu", dtype="float32")
    keep = stratified_steps(5, 2)
    assert keep == {0, 4}
    with recording(pipe.c.lm, "t2i", keep_step=lambda s: s in keep, keep_cache=lambda i: i == 0) as program:
        pipe(TaskRequest(task="t2i", prompt="x", height=32, width=32, sampler=SamplerConfig(steps=5)),
             progress=False)
    queries = [c for c in program.calls if not c.update_cache]
    assert [c.step for c in queries] == [0, 4]
    assert all(c.cache == 0 for c in queries)
