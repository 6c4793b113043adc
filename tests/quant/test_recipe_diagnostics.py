"""Recipe mistakes as one line naming the file and where: YAML errors with line and column, unknown
formats with the allowed list, rules that match no tensor warned by `plan`, refused by `quantize`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli
from lance_deploy.quant.plan import plan_checkpoint
from lance_deploy.quant.recipe import load_recipe, shipped_recipes


def _ckpt() -> str:
    return str(golden_root() / "ckpt" / "Lance_3B")


def _error(args) -> str:
    res = CliRunner().invoke(cli, args)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and "Traceback" not in res.stderr and len(lines) == 1, (res.exit_code, res.stderr)
    return lines[0]


@pytest.mark.parametrize("text, where, what", [
    ('name: x\nrules:\n  - match: "*"\n    format: !!python/object/apply:os.system ["echo hi"]\n',
     "line 4, column 13", "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:"
     "os.system' (recipes are plain data: python tags are never constructed)"),
    ('name: x\nrules:\n  - match: "*"\n    format: [int8\n', "line 5, column 1",
     "while parsing a flow sequence (from line 4, column 13); expected ',' or ']', but got '<stream end>'"),
    ("name: x\n\trules: 1\n", "line 2, column 1", "found character '\\t' that cannot start any token"),
])
def test_yaml_errors_name_file_line_and_column(tmp_path, text, where, what):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = _error(["plan", _ckpt(), "--recipe", str(path)])
    assert line.startswith(f"Error: {path}: not valid YAML at {where}: ") and line.endswith(what), line


def test_unknown_format_lists_the_allowed_ones(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text('name: x\nrules:\n  - {match: "*", format: int3}\n')
    assert _error(["plan", _ckpt(), "--recipe", str(path)]) == (
        f"Error: {path}: rules[0].format: 'int3' not allowed; allowed: bf16, fp8_e4m3, int8, int4, nf4")


def _unmatched(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text('name: typo\nrules:\n  - {match: "blk.*.gen.ffn_upp", format: int8}\n'
                    '  - {match: "*", format: bf16}\n')
    return path


def test_plan_warns_about_a_rule_matching_nothing(tmp_path):
    path = _unmatched(tmp_path)
    res = CliRunner().invoke(cli, ["plan", _ckpt(), "--recipe", str(path)])
    assert res.exit_code == 0 and res.stdout.rstrip().endswith(
        "warning: rules[0] 'blk.*.gen.ffn_upp' matches no tensor")
    res = CliRunner().invoke(cli, ["plan", _ckpt(), "--recipe", str(path), "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["warnings"] == ["rules[0] 'blk.*.gen.ffn_upp' matches no tensor"]
    assert res.stderr.strip() == "warning: rules[0] 'blk.*.gen.ffn_upp' matches no tensor"


def test_quantize_refuses_a_rule_matching_nothing_unless_allowed(tmp_path):
    path, out = _unmatched(tmp_path), tmp_path / "art"
    args = ["quantize", _ckpt(), "--recipe", str(path), "--out", str(out), "--device", "cpu"]
    assert _error(args) == (f"Error: --recipe {path}: rules[0] 'blk.*.gen.ffn_upp' matches no tensor of {_ckpt()}; "
                            "fix its match (see `lance-deploy plan`) or pass --allow-unmatched")
    assert not out.exists() and not (tmp_path / "art.job").exists()  # refused before any work
    res = CliRunner().invoke(cli, [*args, "--allow-unmatched"])
    assert res.exit_code == 0, res.output
    assert "warning: --recipe" in res.stderr and (out / "manifest.json").is_file()


@pytest.mark.parametrize("variant", ["Lance_3B", "Lance_3B_Video"])
def test_shipped_recipes_warn_about_nothing(variant):
    """Their trailing catch-all '*' matches nothing when earlier rules cover everything: not a typo."""
    for name in shipped_recipes():
        plan = plan_checkpoint(golden_root() / "ckpt" / variant, load_recipe(name))
        assert plan.unused_rules and plan.unmatched_warnings == [], name
