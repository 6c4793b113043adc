"""`run --prompt-file` / `--seeds`: one load, outputs as they finish, resume, bad lines by number."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from golden_data import golden_root
from PIL import Image

from lance_deploy.cli import cli

BASE = ["--height", "32", "--width", "32", "--steps", "1", "--device", "cpu"]


def _ckpt():
    return golden_root() / "ckpt" / "Lance_3B"


def _run(*args):
    res = CliRunner().invoke(cli, ["run", "t2i", "--model", str(_ckpt()), *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def _events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _count_loads(monkeypatch) -> list:
    from lance_deploy.pipeline.pipeline import LancePipeline

    loads, real = [], LancePipeline.from_path.__func__

    def counting(cls, *a, **k):
        loads.append(a[0])
        return real(cls, *a, **k)

    monkeypatch.setattr(LancePipeline, "from_path", classmethod(counting))
    return loads


def test_jsonl_batch_mixed_overrides_then_resume(tmp_path, monkeypatch):
    lines = [
        {"prompt": "a red boat", "seed": 3, "out": "boat.png"},
        {"prompt": "a cat", "height": 48},
        "this line is not JSON",
        {"prompt": "a dog", "width": 64, "negative_prompt": "blurry"},
        {"prompt": "blue sky", "steps": 2, "seed": 7},
        {"prompt": "a tree", "out": "tree", "cfg": 1.0},
    ]
    pf = tmp_path / "prompts.jsonl"
    pf.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "outs"
    loads = _count_loads(monkeypatch)
    code, stdout, stderr = _run("--prompt-file", pf, "--out", out, "--json", *BASE)
    assert code == 2, stderr  # one line was refused
    assert len(loads) == 1  # the model loads once for the whole batch
    summary = json.loads(stdout)
    by_line = {it["line"]: it for it in summary["items"]}
    assert by_line[3]["status"] == "invalid" and "not valid JSON" in by_line[3]["error"]
    assert summary["counts"] == {"ok": 5, "skipped": 0, "invalid": 1, "failed": 0}
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert names == ["boat.png", "t2i-0002-s42.png", "t2i-0004-s42.png", "t2i-0005-s7.png", "tree.png"]
    assert np.asarray(Image.open(out / "t2i-0002-s42.png")).shape[:2] == (48, 32)
    assert np.asarray(Image.open(out / "t2i-0004-s42.png")).shape[:2] == (32, 64)
    meta = json.loads(Image.open(out / "boat.png").text["lance-deploy"])  # the parameters travel with the file
    assert meta["seed"] == 3 and meta["prompt"] == "a red boat"
    assert json.loads(Image.open(out / "t2i-0004-s42.png").text["lance-deploy"])["negative_prompt"] == "blurry"
    assert json.loads(Image.open(out / "t2i-0005-s7.png").text["lance-deploy"])["steps"] == 2
    assert json.loads(Image.open(out / "tree.png").text["lance-deploy"])["cfg"] == 1.0
    events = _events(stderr)
    assert any(e["event"] == "progress" and e["phase"] == "t2i batch" and e["done"] == 5 for e in events)
    assert sum(e["event"] == "item" and e["status"] == "ok" for e in events) == 5  # reported as each finished

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stdout, stderr = _run("--prompt-file", pf, "--out", out, "--json", *BASE)
    assert code == 2, stderr
    assert len(loads) == 1  # nothing left to make: no load at all
    assert json.loads(stdout)["counts"] == {"ok": 0, "skipped": 5, "invalid": 1, "failed": 0}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_bad_line_is_reported_by_number_and_the_rest_run(tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("# captions\na boat\n\na cat\n")
    out = tmp_path / "o"
    code, stdout, stderr = _run("--prompt-file", pf, "--out", out, "--quiet", "--seeds", "1", *BASE)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["t2i-0002-s1.png", "t2i-0004-s1.png"]  # file line numbers
    assert stdout.count("wrote ") == 2

    pf.write_text('{"prompt": "x", "height": 33}\n{"prompt": "y", "colour": "red"}\n')
    pf = pf.rename(tmp_path / "p.jsonl")
    code, stdout, stderr = _run("--prompt-file", pf, "--out", out, "--quiet", *BASE)
    assert code == 2
    assert f"--prompt-file {pf} line 1: --height 33" in stderr
    assert f"--prompt-file {pf} line 2: unknown key 'colour'" in stderr


def test_seed_sweep_without_a_file_and_upstream_json(tmp_path):
    out = tmp_path / "sweep"
    code, _, stderr = _run("--prompt", "a boat", "--num-images", "2", "--seed", "5", "--out", out, "--quiet",
                                *BASE)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["t2i-0001-s5.png", "t2i-0001-s6.png"]

    pf = tmp_path / "example.json"  # upstream's config/examples format: output name -> caption
    pf.write_text(json.dumps({"000000.png": "a red boat", "000001.png": "a blue boat"}))
    code, _, stderr = _run("--prompt-file", pf, "--out", out, "--quiet", *BASE)
    assert code == 0, stderr
    assert {"000000.png", "000001.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("args, needle", [
    (["--seeds", "1,x"], "--seeds '1,x': expected comma-separated integers"),
    (["--seeds", "1,1"], "a seed is repeated"),
    (["--seeds", "1", "--num-images", "2"], "--seeds and --num-images both pick the seeds"),
    (["--num-images", "0"], "--num-images"),
    (["--seeds", "1", "--out", "one.png"], "a batch writes one file per item; give a folder"),
    (["--seeds", "1", "--save-latents", "l.safetensors"], "--save-latents names one file"),
])
def test_batch_usage_errors_exit_2_before_loading(tmp_path, monkeypatch, args, needle):
    loads = _count_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code, _, stderr = _run("--prompt", "a boat", *args, *BASE)
    assert code == 2 and needle in stderr, stderr
    assert loads == []


def test_missing_media_is_refused_by_line_before_loading(tmp_path, monkeypatch):
    loads = _count_loads(monkeypatch)
    pf = tmp_path / "edits.jsonl"
    pf.write_text('{"prompt": "add snow", "image": "media/none.png"}\n{"prompt": "add rain"}\n')
    res = CliRunner().invoke(cli, ["run", "image_edit", "--model", str(_ckpt()), "--prompt-file", str(pf),
                                   "--out", str(tmp_path / "o"), "--device", "cpu", "--json"])
    assert res.exit_code == 2 and loads == []
    items = json.loads(res.stdout)["items"]
    assert [it["status"] for it in items] == ["invalid", "invalid"]
    assert str(tmp_path / "media" / "none.png") in items[0]["error"]  # relative to the prompt file
    assert "image_edit needs --image FILE" in items[1]["error"]
