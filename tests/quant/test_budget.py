"""`--budget`: measured per-group sensitivity, knapsack selection, the rewritten recipe, and the
quality of the chosen mix against uniform recipes of the same size, on the golden tiny checkpoint."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.quant import budget as B
from lance_deploy.quant.plan import format_plan, resolve_plan
from lance_deploy.quant.recipe import Recipe, load_recipe
from lance_deploy.quant.rule import QuantChoice, QuantRule


def _ckpt():
    return golden_root() / "ckpt" / "Lance_3B"


def _small(recipe: Recipe) -> Recipe:
    """CI-sized calibration: 2 t2i samples, 4 steps, 32x32."""
    calib = dataclasses.replace(recipe.calibration, tasks=("t2i",), samples_per_task=2, steps=4, timesteps="all",
                                height=32, width=32)
    return recipe.replace(calibration=calib)


@pytest.fixture(scope="module")
def problem():
    p, source = B.prepare(_ckpt(), _small(load_recipe("budget-12gb")))
    return B.measure_problem(p, source)


def _budgets(p):
    return np.linspace(p.min_bytes, p.max_bytes, 7).astype(int).tolist()


def test_groups_and_bytes_come_from_the_plan(problem):
    assert len(problem.groups) == 8  # 2 layers x {und, gen} x {attn, mlp}
    bf16 = problem.sizes[:, 0]
    assert (problem.sizes <= bf16[:, None]).all()  # every candidate stores at most bf16's bytes
    assert all(len(problem.table.local[g]) == len(problem.candidates) for g in problem.groups)
    assert all(problem.table.gain[g] >= 0 for g in problem.groups)


def test_selected_plan_fits_every_budget(problem):
    for b in _budgets(problem):
        res = B.choose(problem, b)
        assert res.plan.total_bytes <= b
        assert sum(c.bytes for c in res.choices) + res.fixed_bytes == res.plan.total_bytes


def test_bigger_budget_never_has_more_error(problem):
    errors = [B.choose(problem, b).total_error for b in _budgets(problem)]
    assert all(later <= earlier + 1e-15 for earlier, later in itertools.pairwise(errors)), errors


def test_bf16_size_keeps_bf16_unless_a_candidate_measures_better(problem):
    """At the all-bf16 size every group takes its least-error candidate: bf16, except where a
    calibrated candidate (GPTQ int8) measured a lower error than bf16 rounding, or a group does
    not reach the consumed output at all (gain 0: the last layer's und MLP under t2i-only
    calibration), where equal errors go to the fewer bytes."""
    res = B.choose(problem, problem.max_bytes)
    err = problem.errors()
    for i, c in enumerate(res.choices):
        assert err[i, c.candidate] == err[i].min()
        if c.candidate != 0:
            assert err[i, c.candidate] < err[i, 0] or (err[i, 0] == 0 and c.bytes < problem.sizes[i, 0])
    bf16_only = problem.base.replace(rules=(QuantRule(match="blk.*", format="bf16"), *problem.base.rules))
    assert resolve_plan(problem.shapes, bf16_only).total_bytes == problem.max_bytes


def test_impossible_budget_names_the_minimum(problem):
    with pytest.raises(B.BudgetError, match=f"{problem.min_bytes:,} bytes"):
        B.choose(problem, problem.min_bytes - 1)


def test_recipe_rules_precede_the_catch_all_and_plan_prints(problem):
    res = B.choose(problem, (problem.min_bytes + problem.max_bytes) // 2)
    n_new = len(res.recipe.rules) - len(problem.base.rules)
    assert res.recipe.rules[n_new:] == problem.base.rules and res.recipe.rules[-1].match == "*"
    again = Recipe.from_yaml_text(res.recipe.to_yaml())  # serialisable and valid
    assert resolve_plan(problem.shapes, again).total_bytes == res.plan.total_bytes
    text = format_plan(res.plan)
    assert "projected weights fits" in text
    for c in res.choices:
        for name in c.group.names:
            assert res.plan.entry(name).format == problem.candidates[c.candidate].format


def test_quantize_with_budget_writes_the_selection(problem, tmp_path):
    from lance_deploy.quant.quantize import quantize

    target = (problem.min_bytes + problem.max_bytes) // 2
    expected = B.choose(problem, target)
    out = tmp_path / "art"
    res = quantize(_ckpt(), problem.base, out, budget=target, programs=problem.programs, progress=False)
    assert res.plan.total_bytes <= target
    manifest = json.loads((out / "manifest.json").read_text())
    fmt = {t["name"]: t["format"] for t in manifest["tensors"]}
    for c in expected.choices:
        for name in c.group.names:
            assert fmt[name] == problem.candidates[c.candidate].format, name


def test_cli_budget_refuses_impossible_size(tmp_path):
    from lance_deploy.cli import cli

    r = CliRunner().invoke(cli, ["quantize", str(_ckpt()), "--recipe", "budget-12gb", "--budget", "1MiB",
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "below the smallest plan" in r.output, r.output


def _snr(artifact, refs, requests) -> float:
    from lance_deploy.pipeline.pipeline import LancePipeline
    from lance_deploy.quant.metrics import sqnr_db

    q = LancePipeline.from_path(artifact, "t2i", device="cpu", dtype="float32")
    return float(np.mean([sqnr_db(r, q(req, progress=False).latents[-1]) for r, req in zip(refs, requests)]))


def test_budget_mix_beats_uniform_recipes_of_the_same_size(problem, tmp_path):
    """Final-latent SNR over a 10-step t2i (CFG, same seeds) against the fp32 model."""
    import shutil

    from lance_deploy.pipeline.pipeline import LancePipeline
    from lance_deploy.pipeline.sampler import SamplerConfig
    from lance_deploy.pipeline.tasks import TaskRequest
    from lance_deploy.quant.quantize import quantize

    prompts = ["a red boat on a lake", "a cat in the snow", "a city at night"]
    requests = [TaskRequest(task="t2i", prompt=p, height=32, width=32, sampler=SamplerConfig(steps=10), seed=100 + i)
                for i, p in enumerate(prompts)]
    ref = LancePipeline.from_path(_ckpt(), "t2i", device="cpu", dtype="float32")
    refs = [ref(r, progress=False).latents[-1] for r in requests]
    def uniform(c: QuantChoice, name: str) -> Recipe:
        rule = QuantRule(match="blk.*", **{k: getattr(c, k) for k in QuantChoice.__dataclass_fields__})
        return problem.base.replace(name=name, rules=(rule, *problem.base.rules))

    # Uniform decoder recipes; the mix gets the same byte count. (Measured once, not asserted: at
    # the byte size of the hand-made budget-12gb recipe, gen int8 + und int4, the mix reached
    # 26.1 dB against its 28.1 dB; see the budget.py docstring on the first-order estimate.)
    uniform = {"uniform fp8_e4m3 rtn": uniform(problem.candidates[2], "fp8"),
               "uniform int8 gptq": uniform(problem.candidates[1], "int8")}
    results = {}
    for label, recipe in uniform.items():
        size = resolve_plan(problem.shapes, recipe).total_bytes
        mix = B.choose(problem, size)
        quantize(_ckpt(), recipe, tmp_path / "u", programs=problem.programs, progress=False, overwrite=True)
        quantize(_ckpt(), mix.recipe, tmp_path / "m", programs=problem.programs, progress=False, overwrite=True)
        results[label] = (size, _snr(tmp_path / "u", refs, requests), mix.plan.total_bytes,
                          _snr(tmp_path / "m", refs, requests))
        for d in ("u", "m"):  # fresh job folders for the next pair
            shutil.rmtree(tmp_path / f"{d}.job", ignore_errors=True)
    print("\nfinal-latent SNR (dB), 10-step t2i, 3 prompts:")
    for label, (ub, us, mb, ms) in results.items():
        print(f"  {label}: uniform {ub:,} B {us:.2f} dB | budget mix {mb:,} B {ms:.2f} dB")
    for label, (ub, us, mb, ms) in results.items():
        assert mb <= ub
        assert ms >= us - 0.05, f"{label}: budget mix {ms:.2f} dB < uniform {us:.2f} dB"
