"""`--preset` on memory-plan and run: the table fills budget, markers and weights; explicit flags win;
and the command says what it chose."""

from __future__ import annotations

import json

from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli


def _invoke(*args):
    res = CliRunner().invoke(cli, list(map(str, args)))
    return res.exit_code, res.stdout, res.stderr


def test_memory_plan_preset_and_explicit_overrides():
    ckpt = golden_root() / "ckpt"
    base = ["memory-plan", "--model", ckpt, "--task", "t2i", "--height", "64", "--width", "64", "--json"]
    code, out, err = _invoke(*base, "--preset", "rtx3090")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["preset"]["gpu_memory"] == "22GiB" and plan["preset"]["weights"] == "int8"
    assert plan["preset"]["markers"] == "auto" and plan["budget_bytes"] == 22 * 2**30 and plan["recipe"] == "int8"

    code, out, err = _invoke(*base, "--preset", "rtx3090", "--gpu-memory", "8GiB", "--weights", "int4",
                             "--markers", "stream")
    assert code == 0, err
    chosen = json.loads(out)["preset"]
    assert (chosen["gpu_memory"], chosen["weights"], chosen["markers"]) == ("8GiB", "int4", "stream")
    assert json.loads(out)["budget_bytes"] == 8 * 2**30 and json.loads(out)["recipe"] == "int4"

    code, out, err = _invoke(*base[:-1], "--preset", "h100")
    assert code == 0 and "note: preset h100" in err and "--weights fp8" in err


def test_run_preset_on_a_release_prints_the_quantize_command(tmp_path):
    ckpt = golden_root() / "ckpt" / "Lance_3B"
    code, out, err = _invoke("run", "t2i", "--model", ckpt, "--prompt", "a boat", "--height", "32", "--width", "32",
                             "--steps", "1", "--device", "cpu", "--out", tmp_path / "a.png", "--json",
                             "--preset", "rtx4060ti-16gb", "--gpu-memory", "9GiB")
    assert code == 0, err
    chosen = json.loads(out)["preset"]
    assert chosen["gpu_memory"] == "9GiB" and chosen["recipe_used"] == "release"
    assert chosen["quantize_command"] == f"lance-deploy quantize {ckpt} --recipe fp8-ada-hopper --out DIR"
    notes = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(n["event"] == "note" and "preset rtx4060ti-16gb" in n["message"] for n in notes)


def test_preset_on_an_artifact_keeps_its_own_recipe(tmp_path):
    from input_cases import quantized_artifact

    art = quantized_artifact(tmp_path / "q", "int8-rtn")
    code, out, err = _invoke("run", "t2i", "--model", art, "--prompt", "a boat", "--height", "32", "--width", "32",
                             "--steps", "1", "--device", "cpu", "--out", tmp_path / "a.png", "--json",
                             "--preset", "rtx4090")
    assert code == 0, err
    chosen = json.loads(out)["preset"]
    assert chosen["recipe_used"] == "artifact" and "quantize_command" not in chosen
    notes = [json.loads(line)["message"] for line in err.splitlines() if line.startswith('{"event": "note"')]
    assert any("its own recipe is used" in n for n in notes), notes

    base = ["memory-plan", "--model", art, "--task", "t2i", "--height", "64", "--width", "64", "--json"]
    code, out, err = _invoke(*base, "--preset", "rtx3090")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["preset"]["weights"] is None and "the artifact's own weights" in plan["preset"]["note"]
    code, out, err = _invoke(*base, "--gpu-memory", "22GiB")
    assert code == 0, err
    plain = json.loads(out)  # the preset packs nothing on top of the manifest's formats
    assert plan["recipe"] is None and plan["layer_bytes"] == plain["layer_bytes"] and plan["weights"] == plain["weights"]
