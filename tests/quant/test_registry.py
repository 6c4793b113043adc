"""The algorithm registry and the fold rule: recipes allow its names, the quantizer runs its
functions, and the plan (bytes, ``smooth``) and the quantizer (folded norm or runtime divisor)
decide every fold the same way."""

from __future__ import annotations

import pytest
import torch

from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.names import expected_lance_shapes
from lance_deploy.config import TINY_LLM
from lance_deploy.formats import FormatSpec
from lance_deploy.model.mot import MoTLayer
from lance_deploy.model.tree import EXPERTS, INPUT_GROUPS
from lance_deploy.quant.algorithms import LayerStats, awq, smoothquant
from lance_deploy.quant.algorithms.registry import ALGORITHMS, CALIBRATED, REGISTRY, folds
from lance_deploy.quant.apply import LinearJob, linear_jobs, quantize_layer
from lance_deploy.quant.plan import resolve_plan
from lance_deploy.quant.recipe import Recipe, RecipeError

INT4 = FormatSpec("int4", group_size=32)
W8A8 = FormatSpec("int8", activations="dynamic_per_token")


def _stats(n: int, seed: int = 0) -> LayerStats:
    return LayerStats(n).update(torch.randn(64, n, generator=torch.Generator().manual_seed(seed)))


def test_recipes_allow_exactly_the_registered_algorithms():
    rule = {"match": "*", "format": "int8", "activations": "dynamic_per_token"}
    for name in ALGORITHMS:
        fmt = {"format": "bf16", "activations": None} if name == "none" else {}
        calibration = {"tasks": ["t2i"]} if name in CALIBRATED else None
        Recipe.from_dict({"name": "t", "rules": [dict(rule, algorithm=name, **fmt)], "calibration": calibration})
    with pytest.raises(RecipeError, match="'bogus' not allowed; allowed: " + ", ".join(ALGORITHMS)):
        Recipe.from_dict({"name": "t", "rules": [dict(rule, algorithm="bogus")]})
    with pytest.raises(RecipeError, match=r"params\.grid: unknown parameter for gptq; allowed: block_size"):
        Recipe.from_dict({"name": "t", "rules": [dict(rule, algorithm="gptq", params={"grid": 4})],
                          "calibration": {"tasks": ["t2i"]}})


def test_registered_functions_are_the_algorithms():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    stats = _stats(64)
    got, want = REGISTRY["awq"].quantize(w, stats, INT4, grid=5), awq(w, stats, INT4, grid=5).runtime()
    assert torch.equal(got.qdata, want.qdata) and torch.equal(got.smooth, want.smooth)
    got, want = REGISTRY["smoothquant"].quantize(w, stats, W8A8, alpha=0.5), smoothquant(w, stats, W8A8, 0.5).runtime()
    assert torch.equal(got.qdata, want.qdata) and torch.equal(got.smooth, want.smooth)
    assert torch.equal(REGISTRY["none"].quantize(w, None, FormatSpec("bf16")).qdata, w.bfloat16())
    layer = MoTLayer(TINY_LLM, 0, with_gen=False)
    with pytest.raises(ValueError, match="self_attn.o_proj: gptq needs calibration statistics"):
        quantize_layer(layer, {"self_attn.o_proj": LinearJob("self_attn.o_proj", INT4, "gptq")}, {})
    with pytest.raises(ValueError, match="unknown algorithm 'bogus'; allowed: " + ", ".join(ALGORITHMS)):
        quantize_layer(layer, {"self_attn.o_proj": LinearJob("self_attn.o_proj", INT4, "bogus")}, {})


def test_fold_rule():
    awq4 = (INT4, "awq", {"grid": 4})
    assert folds([awq4, awq4, awq4]) and folds([(W8A8, "smoothquant", {})] * 2)
    assert not folds([awq4, awq4, (INT4, "awq", {"grid": 5})])  # params differ
    assert not folds([awq4, (FormatSpec("int4", group_size=64), "awq", {"grid": 4})])  # specs differ
    assert not folds([awq4, None])  # a member left unquantized
    assert not folds([(INT4, "gptq", {})] * 3) and not folds([(INT4, "bogus", {})] * 2)  # nothing to fold


@pytest.mark.parametrize("q_grid", [4, 5], ids=["shared", "q-differs"])
def test_plan_and_quantizer_fold_alike(q_grid):
    """q with its own AWQ params breaks the q/k/v fold in both the plan and the quantized layer."""
    rules = [{"match": "blk.*.*.attn_q", "format": "int4", "group_size": 32, "algorithm": "awq",
              "params": {"grid": q_grid}},
             {"match": "blk.*", "format": "int4", "group_size": 32, "algorithm": "awq", "params": {"grid": 4}},
             {"match": "*", "format": "bf16"}]
    recipe = Recipe.from_dict({"name": "t", "rules": rules, "calibration": {"tasks": ["t2i"]}})
    plan = resolve_plan(cn.canonical_shapes(expected_lance_shapes(TINY_LLM, "image")), recipe)
    layer = MoTLayer(TINY_LLM, 0, with_gen=True)
    jobs = linear_jobs(e for e in plan.entries if cn.layer_of(e.name) == 0 and cn.is_linear_weight(e.name))
    stats = {(expert, name): _stats(layer.get_submodule(group.probe(expert)).in_features)
             for expert in EXPERTS for name, group in INPUT_GROUPS.items()}
    result = quantize_layer(layer, jobs, stats)
    assert set(result.packed) == set(jobs)
    for e in plan.entries:
        if cn.layer_of(e.name) == 0 and cn.is_linear_weight(e.name):
            assert (result.packed[cn.module_path(e.name)].smooth is not None) == e.smooth, e.name
    folded = {"input_layernorm", "input_layernorm_moe_gen"} if q_grid == 4 else set()
    assert set(result.norms) == folded | {"post_attention_layernorm", "post_attention_layernorm_moe_gen"}
    assert plan.entry("blk.0.gen.attn_k").smooth == (q_grid != 4)
