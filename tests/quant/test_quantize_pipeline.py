"""quantize -> run -> eval on the golden tiny checkpoints, resume and tamper safety."""

from __future__ import annotations

import dataclasses
import filecmp
import json

import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli
from lance_deploy.pipeline.pipeline import LancePipeline
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.quant.quantize import quantize
from lance_deploy.quant.recipe import load_recipe, shipped_recipes


def _fast(recipe, tasks=("t2i",)):
    """The shipped recipe with a small calibration (CI-sized; the rules are untouched)."""
    if recipe.calibration is None:
        return recipe
    calib = dataclasses.replace(recipe.calibration, tasks=tasks, samples_per_task=2, steps=4, timesteps="all",
                                height=32, width=32)
    return recipe.replace(calibration=calib)


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_quantizes_and_runs(name, tmp_path):
    out = tmp_path / name
    quantize(golden_root() / "ckpt" / "Lance_3B", _fast(load_recipe(name)), out, progress=False)
    pipe = LancePipeline.from_path(out, ("t2i", "x2t_image"), device="cpu", dtype="float32")
    img = pipe(TaskRequest(task="t2i", prompt="a red boat", height=32, width=32, sampler=SamplerConfig(steps=3)),
               progress=False)
    assert img.frames.shape == (1, 32, 32, 3)
    ans = pipe(TaskRequest(task="x2t_image", image=img.frames[0], question="what?", max_new_tokens=3,
                           preset="image_256res"), progress=False)
    assert 1 <= len(ans.token_ids) <= 3


def test_all_seven_tasks_run_from_artifacts(tmp_path):
    import numpy as np

    image_art, video_art = tmp_path / "img", tmp_path / "vid"
    recipe = _fast(load_recipe("budget-16gb"))
    quantize(golden_root() / "ckpt" / "Lance_3B", recipe, image_art, progress=False)
    quantize(golden_root() / "ckpt" / "Lance_3B_Video", recipe, video_art, progress=False)
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    video = np.random.default_rng(1).integers(0, 255, (9, 40, 48, 3), dtype=np.uint8)
    s = SamplerConfig(steps=2)
    small = {"preset": "image_256res", "vae_area_side": 64, "vit_area_side": 56}
    requests = {
        image_art: [TaskRequest(task="t2i", prompt="x", height=32, width=32, sampler=s),
                    TaskRequest(task="image_edit", prompt="x", image=image, sampler=s, **small),
                    TaskRequest(task="x2t_image", question="q", image=image, max_new_tokens=2, **small)],
        video_art: [TaskRequest(task="t2v", prompt="x", height=32, width=32, frames=5, sampler=s),
                    TaskRequest(task="i2v", prompt="x", image=image, frames=5, sampler=s, **small),
                    TaskRequest(task="video_edit", prompt="x", video=video, video_fps=12.0, sampler=s, **small),
                    TaskRequest(task="x2t_video", question="q", video=video, video_fps=12.0, max_new_tokens=2,
                                **small)],
    }
    for art, reqs in requests.items():
        pipe = LancePipeline.from_path(art, tuple(r.task for r in reqs), device="cpu", dtype="float32")
        for req in reqs:
            out = pipe(req, progress=False)
            assert getattr(out, "frames", None) is not None or out.token_ids, req.task


def test_interrupted_quantize_resumes_byte_identical(tmp_path, monkeypatch):
    import lance_deploy.quant.quantize as q

    recipe = _fast(load_recipe("budget-8gb"))
    src = golden_root() / "ckpt" / "Lance_3B"
    quantize(src, recipe, tmp_path / "clean", progress=False)

    real, calls = q.quantize_one_layer, []

    def dies_on_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-run")
        return real(*args, **kwargs)

    monkeypatch.setattr(q, "quantize_one_layer", dies_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        quantize(src, recipe, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed").exists()  # a half-written artifact never looks valid
    monkeypatch.setattr(q, "quantize_one_layer", real)
    res = quantize(src, recipe, tmp_path / "resumed", progress=False)
    assert res.resumed_layers == 1
    cmp = filecmp.dircmp(tmp_path / "clean", tmp_path / "resumed")
    assert not cmp.left_only and not cmp.right_only
    # two separate jobs differ only in their start time; everything else is the same bytes
    assert set(cmp.diff_files) <= {"manifest.json"}
    clean, resumed = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("clean", "resumed"))
    assert clean.pop("created") != "" and resumed.pop("created") != ""
    assert clean == resumed
    for sub in ("weights",):
        c = filecmp.dircmp(tmp_path / "clean" / sub, tmp_path / "resumed" / sub)
        assert not c.diff_files, c.diff_files
        _, mismatch, errors = filecmp.cmpfiles(tmp_path / "clean" / sub, tmp_path / "resumed" / sub, c.common_files,
                                               shallow=False)
        assert not mismatch and not errors


def test_resume_with_changed_settings_is_refused(tmp_path):
    from lance_deploy.core.errors import LanceUsageError

    src = golden_root() / "ckpt" / "Lance_3B"
    recipe = _fast(load_recipe("budget-8gb"))
    quantize(src, recipe, tmp_path / "a", work_dir=tmp_path / "job", progress=False)
    changed = recipe.replace(calibration=dataclasses.replace(recipe.calibration, samples_per_task=3))
    with pytest.raises(LanceUsageError, match="samples_per_task"):
        quantize(src, changed, tmp_path / "b", work_dir=tmp_path / "job", progress=False)


def _run(args):
    res = CliRunner().invoke(cli, args)
    return res.exit_code, (res.stderr if hasattr(res, "stderr") else res.output)


def test_tampered_shard_is_named(tmp_path):
    out = tmp_path / "art"
    quantize(golden_root() / "ckpt" / "Lance_3B", _fast(load_recipe("fp8-ada-hopper")), out, progress=False)
    shard = out / "weights" / "gen-000-001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, err = _run(["run", "t2i", "--model", str(out), "--prompt", "x", "--height", "32", "--width", "32",
                      "--steps", "1", "--out", str(tmp_path / "o.png")])
    assert code in (1, 2)
    assert "gen-000-001.safetensors" in err and "Traceback" not in err


def test_manifest_pointing_outside_is_refused(tmp_path):
    out = tmp_path / "art"
    quantize(golden_root() / "ckpt" / "Lance_3B", _fast(load_recipe("budget-16gb")), out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tensors"][0]["shard"] = "../../etc/passwd"
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, err = _run(["run", "t2i", "--model", str(out), "--prompt", "x", "--height", "32", "--width", "32",
                      "--steps", "1", "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "manifest.json" in err and "Traceback" not in err


def test_quantize_and_eval_cli(tmp_path):
    out = tmp_path / "art"
    code, err = _run(["quantize", str(golden_root() / "ckpt" / "Lance_3B"), "--recipe", "int8-ampere", "--out",
                      str(out), "--samples", "1", "--device", "cpu", "--json"])
    assert code == 0, err
    code, err = _run(["eval", "--reference", str(golden_root() / "ckpt" / "Lance_3B"), "--model", str(out),
                      "--samples", "1", "--steps", "3", "--size", "32", "--device", "cpu", "--json"])
    assert code == 0, err
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["tasks"]["t2i"]["final_latent_snr_db"] > 20
    assert "greedy_token_agreement" in report["tasks"]["x2t_image"]
    assert (out / "report" / "report.md").is_file() and (out / "report" / "t2i-0.png").is_file()


def test_sigkill_mid_layer_then_resume(tmp_path):
    """A real `kill -9` while the second layer is being quantized; the resumed artifact equals a clean one."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    src = golden_root() / "ckpt" / "Lance_3B"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(_fast(load_recipe("budget-8gb")).to_yaml())
    child = textwrap.dedent(f"""
        import time
        import lance_deploy.quant.quantize as q
        from lance_deploy.quant.recipe import load_recipe
        real, seen = q.quantize_one_layer, []
        def slow(*a, **k):
            seen.append(1)
            if len(seen) == 2:
                time.sleep(120)  # the parent kills us here, mid-layer
            return real(*a, **k)
        q.quantize_one_layer = slow
        q.quantize({str(src)!r}, load_recipe({str(recipe_file)!r}), {str(tmp_path / "killed")!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    progress = tmp_path / "killed.job" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.is_file() and "layer-000" in progress.read_text()):
        time.sleep(0.05)
    assert "layer-000" in progress.read_text()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists()  # only a `.partial` folder, never a valid-looking artifact
    recipe = load_recipe(recipe_file)
    res = quantize(src, recipe, tmp_path / "killed", progress=False)
    assert res.resumed_layers == 1
    quantize(src, recipe, tmp_path / "clean", progress=False)
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "clean" / "weights", tmp_path / "killed" / "weights",
                                           sorted(os.listdir(tmp_path / "clean" / "weights")), shallow=False)
    assert not mismatch and not errors
