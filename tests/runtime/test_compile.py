"""`--compile`: compiled backbone layers match eager on the tiny golden model, with and without
layer streaming; every layer shares one set of graphs; `run --compile` and `load_pipeline(compile=)`
reach `runtime.compile.compile_layers`.

Tolerances are the golden README's float32 ones (section 7): rel-L2 <= 1e-4 and max-abs <= 1e-3.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from golden_data import golden_root, load_case
from golden_requests import request_from_case, run_args
from test_pager import _pipe, _spans

from lance_deploy.runtime import compile as compile_mod
from lance_deploy.runtime.compile import STAGES, compile_layers


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled graphs are cached per code object, shared by every test: start and end empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    return bool((a - b).norm() <= 1e-4 * b.norm() and (a - b).abs().max() <= 1e-3)


def test_compiled_layers_stream_and_match_eager():
    """aot_eager (dynamo + AOT autograd without codegen: the fast half of inductor). Compiled and
    resident, then with every layer of both experts streamed through the pager's slots: both
    match the eager run, and the streamed run compiles nothing new (the weights are graph
    inputs, so pointing them at a slot is no recompile)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    meta, g = load_case("t2i")
    ref = _pipe(meta)(request_from_case(meta, g), progress=False)
    pipe = _pipe(meta)
    counter = CompileCounterWithBackend("aot_eager")
    assert compile_layers(pipe.c.lm, backend=counter) == 2
    assert compile_layers(pipe.c.lm, backend=counter) == 2  # again: no second wrapper
    out = pipe(request_from_case(meta, g), progress=False)
    assert len(out.latents) == len(ref.latents) and all(_close(a, b) for a, b in zip(out.latents, ref.latents))
    compiled = counter.frame_count
    res = pipe.attach_residency(_spans("t2i", {"und": 2, "gen": 2}))
    with torch.compiler.set_stance("fail_on_recompile"):
        paged = pipe(request_from_case(meta, g), progress=False)
    assert res.ledger.phase_moved["denoise"] > 0  # the layers did stream
    assert counter.frame_count == compiled
    assert all(torch.equal(a, b) for a, b in zip(paged.latents, out.latents))


@pytest.mark.parametrize("gen_rows", [None, [3, 4]])
def test_every_layer_runs_the_same_graphs(gen_rows):
    """The KV cache (a list indexed by layer number) stays outside the graphs, so layer 1 reuses
    layer 0's graphs for the same inputs, whether or not the gen expert takes some rows."""
    from torch._dynamo.testing import CompileCounter

    from lance_deploy.model.mot import Routing

    meta, _ = load_case("t2i")
    lm = _pipe(meta).c.lm
    counter = CompileCounter()
    compile_layers(lm, backend=counter)
    cfg = lm.cfg
    x, out = torch.randn(5, cfg.hidden_size), torch.randn(5, cfg.num_attention_heads * cfg.head_dim)
    cos_sin = (torch.ones(5, cfg.head_dim), torch.zeros(5, cfg.head_dim))
    routing = Routing.of(5, None if gen_rows is None else torch.tensor(gen_rows))
    counts = []
    for layer in lm.language_model.model.layers:
        layer.pre_attention(x, cos_sin, routing)
        layer.post_attention(x, out, routing)
        counts.append(counter.frame_count)
    assert counts == [len(STAGES)] * len(counts)


def test_inductor_matches_eager_on_understanding():
    """The default backend (inductor, C++ codegen on CPU): the same greedy answer, logits within tolerance."""
    meta, g = load_case("x2t_image")
    ref = _pipe(meta)(request_from_case(meta, g), progress=False)
    out = _pipe(meta, compile=True)(request_from_case(meta, g), progress=False)
    assert out.token_ids == ref.token_ids and len(out.token_ids) > 1
    assert all(_close(a, b) for a, b in zip(out.logits, ref.logits))


@pytest.mark.slow
def test_inductor_with_streaming_matches_eager_on_generation():
    meta, g = load_case("t2i")
    ref = _pipe(meta)(request_from_case(meta, g), progress=False)
    pipe = _pipe(meta)
    pipe.attach_residency(_spans("t2i", {"und": 1, "gen": 1}))
    compile_layers(pipe.c.lm)
    out = pipe(request_from_case(meta, g), progress=False)
    assert all(_close(a, b) for a, b in zip(out.latents, ref.latents))
    assert abs(out.frames.astype(int) - ref.frames.astype(int)).max() <= 1


W8A8 = "dynamic_per_token"
CPU_PATHS = {"fp8": ("fp8_e4m3", None, None), "fp8_w8a8": ("fp8_e4m3", None, W8A8), "int8": ("int8", None, None),
             "int8_w8a8": ("int8", None, W8A8), "int4_g64": ("int4", 64, None), "nf4": ("nf4", None, None)}


@pytest.mark.parametrize("key", list(CPU_PATHS))
def test_every_cpu_kernel_path_compiles_into_one_graph(key):
    """A quantized layer inside a compiled stage: each CPU kernel path of QLinear traces without a
    graph break (fullgraph) and computes exactly what it computes eagerly."""
    from lance_deploy import formats as F
    from lance_deploy.formats.qlinear import QLinear

    name, group, act = CPU_PATHS[key]
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) / 512**0.5
    m = QLinear(F.quantize_rtn(w, F.FormatSpec(name, group_size=group, activations=act)), torch.randn(256))
    m.prepare("cpu")
    x = torch.randn(7, 512)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), m(x)) and m.kernel(x) != "linear"


@pytest.fixture
def calls(monkeypatch):
    """compile_layers with dynamo's plain 'eager' backend (traced, not code-generated), recorded."""
    real, seen = compile_mod.compile_layers, []

    def record(lm, **kw):
        seen.append(lm)
        return real(lm, backend="eager")

    monkeypatch.setattr(compile_mod, "compile_layers", record)
    return seen


def test_run_compile_flag_compiles_and_answers_the_same(tmp_path, calls):
    from lance_deploy.cli import cli

    meta, g = load_case("x2t_image")
    model = str(golden_root() / "ckpt" / meta["checkpoint"])
    texts = []
    for extra in ([], ["--compile"]):
        r = CliRunner().invoke(cli, ["run"] + run_args(meta, g, tmp_path) + ["--model", model, "--json"] + extra,
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()  # progress events (one JSON per line), then the result object
        texts.append(json.loads("\n".join(lines[max(i for i, x in enumerate(lines) if x == "{"):]))["text"])
    assert len(calls) == 1 and texts[0] == texts[1]
    assert all(s in layer.__dict__ for layer in calls[0].language_model.model.layers for s in STAGES)


def test_load_pipeline_compile_reaches_the_layers(calls):
    from lance_deploy.api import load_pipeline

    meta, _ = load_case("x2t_image")
    pipe = load_pipeline(golden_root() / "ckpt" / meta["checkpoint"], "x2t_image", device="cpu", dtype="float32",
                         compile=True)
    assert calls == [pipe.c.lm]
