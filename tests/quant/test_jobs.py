"""Resumable work dirs: fingerprint drift refused, progress persisted, step outputs reused exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from golden_data import golden_root

from lance_deploy.checkpoint.layout import discover
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.quant.jobs import JobFingerprint, JobState, source_fingerprint
from lance_deploy.quant.recipe import load_recipe


def _fp(recipe_name: str = "int8-ampere", **calib) -> JobFingerprint:
    r = load_recipe(recipe_name)
    if calib:
        r = r.replace(calibration=r.calibration.__class__(**{**r.calibration.__dict__, **calib}))
    return JobFingerprint.of({"fingerprint": "src"}, r.to_dict(), r.calibration.to_dict())


def test_progress_persists_and_resume_reuses_steps(tmp_path):
    job = JobState(tmp_path / "w")
    assert job.start(_fp(), {"device": "cpu"}) is False
    out = {"blk.0.gen.attn_q.qdata": torch.arange(12, dtype=torch.int8).reshape(3, 4),
           "blk.0.gen.attn_q.scale": torch.rand(3, 1)}
    job.save_step("layer-000", out, {"alpha": "0.5"})
    job.done("observe-000")
    raw = (tmp_path / "w" / "steps" / "layer-000.safetensors").read_bytes()

    resumed = JobState(tmp_path / "w")
    assert resumed.start(_fp(), {"device": "cuda"}) is True  # non-fingerprint args may change
    assert resumed.completed() == ["layer-000", "observe-000"]
    assert resumed.is_done("layer-000") and not resumed.is_done("layer-001")
    assert resumed.created == job.created  # so a resumed artifact's manifest is byte-identical
    tensors, meta = resumed.load_step("layer-000")
    assert meta == {"alpha": "0.5"} and all(torch.equal(tensors[k], out[k]) for k in out)
    assert json.loads((tmp_path / "w" / "args.json").read_text())["args"] == {"device": "cuda"}
    resumed.save_step("layer-000", tensors, meta)  # re-saving the loaded outputs gives the same bytes
    assert (tmp_path / "w" / "steps" / "layer-000.safetensors").read_bytes() == raw


@pytest.mark.parametrize("change, named", [
    (lambda: _fp("budget-16gb"), "recipe.name"),
    (lambda: _fp(samples_per_task=99), "calibration.samples_per_task (16 -> 99)"),
    (lambda: JobFingerprint.of({"fingerprint": "other"}, load_recipe("int8-ampere").to_dict(),
                               load_recipe("int8-ampere").calibration.to_dict()), "source.fingerprint"),
    (lambda: JobFingerprint.of({"fingerprint": "src"}, load_recipe("int8-ampere").to_dict(),
                               load_recipe("int8-ampere").calibration.to_dict(), version="9.9"), "version"),
])
def test_fingerprint_drift_is_refused_naming_the_fields(tmp_path, change, named):
    job = JobState(tmp_path / "w")
    job.start(_fp())
    job.done("layer-000")
    with pytest.raises(LanceUsageError, match="--restart") as e:
        JobState(tmp_path / "w").start(change())
    assert named in str(e.value)
    fresh = JobState(tmp_path / "w")
    assert fresh.start(change(), restart=True) is False and fresh.completed() == []


def test_recipe_rule_drift_names_the_rule_field(tmp_path):
    r = load_recipe("int8-ampere")
    JobState(tmp_path / "w").start(JobFingerprint.of({}, r.to_dict(), None))
    changed = r.replace(rules=(r.rules[0], r.rules[1].__class__(**{**r.rules[1].__dict__, "params": {"alpha": 0.8}}),
                               *r.rules[2:]))
    with pytest.raises(LanceUsageError, match=r"recipe\.rules\[1\]\.params\.alpha \(null -> 0\.8\)"):
        JobState(tmp_path / "w").start(JobFingerprint.of({}, changed.to_dict(), None))


def test_corrupt_step_output_and_bad_step_names(tmp_path):
    job = JobState(tmp_path / "w")
    job.start(_fp())
    job.save_step("layer-000", {"x": torch.ones(4)})
    path = tmp_path / "w" / "steps" / "layer-000.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    with pytest.raises(LanceUsageError, match="layer-000.*missing or corrupt"):
        job.load_step("layer-000")
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(LanceUsageError, match="step name"):
            job.done(bad)
    with pytest.raises(LanceUsageError, match="not started"):
        JobState(tmp_path / "other").is_done("x")


def test_source_fingerprint_is_stable_and_content_sensitive(tmp_path):
    src = golden_root() / "ckpt"
    a = source_fingerprint(discover(src / "Lance_3B"))
    assert a == source_fingerprint(discover(src / "Lance_3B"))
    assert set(a.files) >= {"weights", "config", "tokenizer.json", "vit", "vae"}
    assert a.to_dict()["fingerprint"] == a.digest and a.variant == "image"
    copy = tmp_path / "moved"
    shutil.copytree(src, copy, copy_function=shutil.copyfile)
    for d in [copy, *copy.rglob("*")]:  # the golden tree is read-only; let pytest clean the copy
        d.chmod(0o755 if d.is_dir() else 0o644)
    assert source_fingerprint(discover(copy / "Lance_3B")).digest == a.digest  # paths are not identity
    cfg = copy / "Lance_3B" / "llm_config.json"
    cfg.write_text(cfg.read_text().replace("1e-06", "1e-05"))
    assert source_fingerprint(discover(copy / "Lance_3B")).digest != a.digest
