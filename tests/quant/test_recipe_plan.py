"""Recipes (typed config, YAML round trip, strict fields), canonical names and the resolved plan."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy import formats
from lance_deploy.calibrate.config import CalibrationConfig, Stratified
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.names import expected_lance_shapes, expected_vit_shapes
from lance_deploy.cli.common import LanceGroup
from lance_deploy.cli.plan_cmd import plan_cmd
from lance_deploy.config import FULL_LLM, TINY_LLM
from lance_deploy.quant.plan import SKIP, format_plan, plan_checkpoint, plan_to_dict, resolve_plan
from lance_deploy.quant.recipe import Recipe, RecipeError, load_recipe, shipped_recipes

SHIPPED = ("fp8-ada-hopper", "int8-ampere", "budget-16gb", "budget-12gb", "budget-8gb")


def _recipe(*rules: dict, calibration: dict | None = None) -> Recipe:
    return Recipe.from_dict({"name": "t", "rules": list(rules), "calibration": calibration})


def _tiny_shapes() -> dict[str, tuple[int, ...]]:
    return cn.canonical_shapes(expected_lance_shapes(TINY_LLM, "image"))


# --- canonical names ------------------------------------------------------------------------

def test_canonical_names_round_trip_every_release_key():
    shapes = expected_lance_shapes(FULL_LLM, "video")
    linear = [k for k in shapes if cn.is_linear_weight(cn.to_canonical(k))]
    assert all(cn.to_release(cn.to_canonical(k)) == k for k in shapes)
    assert all(cn.to_release(cn.to_canonical(k), vit_prefix="") == k for k in expected_vit_shapes(FULL_LLM.vision))
    assert len(linear) == 36 * 2 * 7 + 5 + 32 * 5 + 2  # decoder, bridges + lm_head, ViT blocks + merger
    assert cn.to_canonical("language_model.model.layers.3.self_attn.q_proj_moe_gen.bias") == "blk.3.gen.attn_q.bias"
    assert cn.to_canonical("language_model.model.layers.7.mlp_moe_gen.down_proj.weight") == "blk.7.gen.ffn_down"
    assert cn.to_canonical("language_model.model.norm_moe_gen.weight") == "out_norm.gen"
    assert (cn.expert_of("blk.3.gen.ffn_up"), cn.layer_of("blk.3.gen.ffn_up")) == ("gen", 3)
    assert cn.expert_of("lm_head") is None and cn.layer_of("vit.blocks.1.attn.qkv.weight") is None
    assert not cn.is_linear_weight("embed_tokens") and not cn.is_linear_weight("blk.0.und.attn_q.bias")
    with pytest.raises(Exception, match="no canonical name"):
        cn.to_canonical("language_model.model.layers.0.self_attn.q_proj.scales")


# --- recipes --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_parses_validates_and_round_trips(name, tmp_path):
    assert name in shipped_recipes()
    r = load_recipe(name)
    assert r.name == name and r.rules[-1].match == "*" and r.calibration is not None
    assert Recipe.from_yaml_text(r.to_yaml()) == r
    (tmp_path / "r.yaml").write_text(r.to_yaml())
    assert load_recipe(tmp_path / "r.yaml") == r


def test_budget_and_explicit_timesteps_round_trip():
    r = _recipe({"match": "*", "format": "int8"}, calibration={"tasks": ["t2i"], "timesteps": [0, 5, 29]})
    r = r.replace(budget=Recipe.from_dict({"name": "x", "rules": [{"match": "*", "format": "bf16"}],
                                           "budget": {"target": "12GiB", "candidates": [{"format": "int8"}]}}).budget)
    again = Recipe.from_yaml_text(r.to_yaml())
    assert again == r and again.budget.target_bytes == 12 * 2**30 and again.calibration.timesteps == (0, 5, 29)
    assert CalibrationConfig(steps=30, timesteps=Stratified(4)).step_indices() == (0, 10, 19, 29)


@pytest.mark.parametrize("where, doc, field", [
    ("top", {"name": "t", "rules": [{"match": "*", "format": "bf16"}], "rulez": []}, "rulez"),
    ("rule", {"name": "t", "rules": [{"match": "*", "fromat": "int8"}]}, "rules[0].fromat"),
    ("calibration", {"name": "t", "rules": [{"match": "*", "format": "bf16"}],
                     "calibration": {"tasks": ["t2i"], "sample_per_task": 3}}, "calibration.sample_per_task"),
])
def test_unknown_field_rejected_with_its_name(where, doc, field):
    with pytest.raises(RecipeError, match=r"unknown field; allowed: ") as e:
        Recipe.from_dict(doc)
    assert field in str(e.value)


@pytest.mark.parametrize("rule, calibration, expected", [
    ({"format": "fp9"}, None, r"rules\[0\]\.format: 'fp9' not allowed; allowed: bf16, fp8_e4m3, int8, int4, nf4"),
    ({"format": "int8", "algorithm": "magic"}, None, r"rules\[0\]\.algorithm: 'magic' not allowed; allowed: rtn"),
    ({"format": "int8", "algorithm": "smoothquant"}, {}, r"smoothquant .* activations: dynamic_per_token"),
    ({"format": "int8", "algorithm": "gptq"}, None, r"calibration: rules \[0\] use calibrated algorithms"),
    ({"format": "int4"}, None, r"int4 group_size None not allowed"),
    ({"format": "int4", "group_size": 64, "activations": "dynamic_per_token"}, None, r"needs fp8_e4m3 or int8"),
    ({"format": "int8", "algorithm": "awq", "params": {"alpha": 1}}, {}, r"params\.alpha: unknown parameter for awq"),
    ({"format": "bf16", "algorithm": "rtn"}, None, r"bf16 takes algorithm 'none'"),
    ({"format": "int8"}, {"tasks": ["t2x"]}, r"calibration\.tasks: 't2x' not allowed; allowed: t2i, t2v"),
    ({"format": "int8"}, {"timesteps": {"stratified": 99}}, r"calibration\.timesteps\.stratified: must be between"),
])
def test_invalid_values_name_the_field_and_allowed_values(rule, calibration, expected):
    with pytest.raises(RecipeError, match=expected):
        _recipe({"match": "*", **rule}, calibration=calibration)


def test_newer_schema_and_unknown_recipe_refused(tmp_path):
    with pytest.raises(RecipeError, match="schema_version 2 not supported"):
        Recipe.from_dict({"schema_version": 2, "name": "t", "rules": [], "new_thing": 1})
    with pytest.raises(RecipeError, match="shipped: budget-12gb"):
        load_recipe("no-such-recipe")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


# --- plan -----------------------------------------------------------------------------------

def test_first_match_wins():
    gen_int8 = {"match": "blk.*.gen.*", "format": "int8"}
    all_fp8 = {"match": "*", "format": "fp8_e4m3"}
    plan = resolve_plan(_tiny_shapes(), _recipe(gen_int8, all_fp8))
    assert plan.entry("blk.1.gen.ffn_up").format == "int8" and plan.entry("blk.1.gen.ffn_up").rule_index == 0
    assert plan.entry("blk.1.und.ffn_up").format == "fp8_e4m3" and plan.entry("lm_head").rule_index == 1
    flipped = resolve_plan(_tiny_shapes(), _recipe(all_fp8, gen_int8))
    assert flipped.entry("blk.1.gen.ffn_up").format == "fp8_e4m3" and flipped.unused_rules == (1,)


def test_globs_never_touch_non_linear_tensors_but_literal_names_do():
    plan = resolve_plan(_tiny_shapes(), _recipe({"match": "embed_tokens", "format": "int8"},
                                                 {"match": "*", "format": "int8"}))
    norm, bias, emb = plan.entry("blk.0.gen.attn_norm"), plan.entry("blk.0.gen.attn_q.bias"), plan.entry("embed_tokens")
    assert (norm.format, norm.rule_index, bias.format, bias.rule_index) == ("bf16", None, "bf16", None)
    assert emb.format == "int8" and emb.packed and emb.rule_index == 0
    assert plan.entry("latent_pos_embed").format == SKIP and plan.entry("latent_pos_embed").bytes == 0
    with pytest.raises(RecipeError, match=r"out_norm.und \(shape \[64\]\) format int8, but only 2-D"):
        resolve_plan(_tiny_shapes(), _recipe({"match": "out_norm.und", "format": "int8"},
                                             {"match": "*", "format": "bf16"}))


def test_unmatched_linear_is_an_error_naming_it():
    with pytest.raises(RecipeError, match=r"1 Linear weight\(s\) match no rule: lm_head \[448, 64\]\. "):
        resolve_plan(_tiny_shapes(), _recipe({"match": "blk.*|time_embedder.*|vae2llm|llm2vae", "format": "int8"}))


def test_group_size_fallback_and_its_absence():
    fallback = {"match": "blk.*", "format": "int4", "group_size": 128, "group_size_fallback": [64]}
    plan = resolve_plan(_tiny_shapes(), _recipe(fallback, {"match": "*", "format": "bf16"}))
    assert plan.entry("blk.0.und.attn_q").group_size == 64 and plan.entry("blk.0.und.ffn_down").group_size == 128
    with pytest.raises(RecipeError, match=r"blk.0.und.attn_q: group_size 128 does not divide in_features 64"):
        resolve_plan(_tiny_shapes(), _recipe({"match": "blk.*", "format": "int4", "group_size": 128},
                                             {"match": "*", "format": "bf16"}))


def _expected_bytes(e) -> int:
    if e.format == SKIP:
        return 0
    if not e.packed:
        n = 1
        for d in e.shape:
            n *= d
        return 2 * n
    return formats.nbytes(e.shape, e.spec()) + (4 * e.shape[1] if e.smooth else 0)


@pytest.mark.parametrize("variant", ["image", "video"])
@pytest.mark.parametrize("name", SHIPPED)
def test_plan_of_golden_checkpoint_for_every_shipped_recipe(name, variant):
    plan = plan_checkpoint(golden_root() / "ckpt", load_recipe(name), variant=variant)
    assert all(e.bytes == _expected_bytes(e) for e in plan.entries)
    assert sum(plan.by("expert").values()) == sum(plan.by("component").values()) == plan.total_bytes
    assert all(e.rule_index is not None for e in plan.entries if cn.is_linear_weight(e.name))
    assert any(e.name.startswith("vit.") for e in plan.entries) and any(e.name.startswith("vae.") for e in plan.entries)
    gen = [e for e in plan.entries if cn.expert_of(e.name) == "gen" and e.packed]
    assert gen and all(e.format != "bf16" for e in gen) and plan.total_bytes < plan.bf16_bytes
    text = format_plan(plan)
    assert f"recipe {name}" in text and "blk.1.gen.ffn_down" in text and f"{plan.total_bytes:,} bytes" in text
    json.dumps(plan_to_dict(plan))


def _cli() -> click.Group:
    group = LanceGroup("lance-deploy")
    group.add_command(plan_cmd)
    return group


def test_plan_cli_json_and_unmatched_error(tmp_path):
    ckpt = str(golden_root() / "ckpt" / "Lance_3B")
    res = CliRunner().invoke(_cli(), ["plan", ckpt, "--recipe", "budget-8gb", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["recipe"]["name"] == "budget-8gb"
    assert data["totals"]["bytes"] == sum(t["bytes"] for t in data["tensors"])
    q = next(t for t in data["tensors"] if t["name"] == "blk.0.gen.attn_q")
    assert (q["format"], q["group_size"], q["algorithm"]) == ("int4", 64, "awq")
    (tmp_path / "r.yaml").write_text(
        "name: partial\nrules:\n  - {match: 'blk.*.gen.*|time_embedder.*|vae2llm|llm2vae', format: int8}\n")
    res = CliRunner().invoke(_cli(), ["plan", ckpt, "--recipe", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2 and "match no rule: lm_head [448, 64], " in res.output
    assert "blk.0.und.attn_q" in res.output
