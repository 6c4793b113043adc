"""`kill -9` a quantize at named points (LANCE_DEPLOY_FAULT, core/faults.py), the seal window
included, then run it again: it resumes and the artifact is byte-identical to an uninterrupted one.

The default suite kills at 4 points (a layer, a random tensor write, the seal window, the
--overwrite swap); the slow test at every named point plus random tensor writes (>= 10).
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.artifact.reader import ArtifactReader
from lance_deploy.cli import cli

RECIPE = "int8-rtn"
NAMED = ["job.step-written#1", "quantize.layer-done#1", "job.step-written#2", "quantize.layer-done#2",
         "artifact.partial-created", "artifact.group-closed#1", "artifact.group-closed#3", "artifact.group-closed#5",
         "artifact.files-copied", "artifact.manifest-written", "artifact.marker-removed", "artifact.old-moved",
         "artifact.sealed"]


def _args(out, overwrite: bool) -> list[str]:
    args = ["quantize", str(golden_root() / "ckpt" / "Lance_3B"), "--recipe", RECIPE, "--out", str(out),
            "--device", "cpu", "--json"]
    return args + (["--overwrite"] if overwrite else [])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "art"
    res = CliRunner().invoke(cli, _args(out, False))
    assert res.exit_code == 0, res.output
    return out


def _same_artifact(clean, out) -> None:
    names = sorted(os.listdir(clean / "weights"))
    assert sorted(os.listdir(out / "weights")) == names
    _, mismatch, errors = filecmp.cmpfiles(clean / "weights", out / "weights", names, shallow=False)
    assert not mismatch and not errors, mismatch
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (clean, out))
    assert a.pop("created") and b.pop("created") and a == b  # two jobs differ only in their start time
    with ArtifactReader(out) as r:
        r.verify()


def _random_write(clean, rng: random.Random) -> str:
    """A kill after the n-th of the tensors streamed into the shards (each one is reached)."""
    with ArtifactReader(clean) as r:
        return f"artifact.tensor-written#{rng.randint(1, len(r.names()))}"


def _kill_and_resume(clean, tmp_path, point: str) -> None:
    out = tmp_path / "art"
    overwrite = point == "artifact.old-moved"  # that point is only reached when replacing an artifact
    if overwrite:
        shutil.copytree(clean, out)
    env = {**os.environ, "LANCE_DEPLOY_FAULT": f"kill@{point}"}
    proc = subprocess.run([sys.executable, "-m", "lance_deploy", *_args(out, overwrite)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
    if point == "artifact.old-moved":
        assert not out.exists() and list(tmp_path.glob("art.old-*"))  # mid-swap: the old one is kept aside
    if point != "artifact.sealed":
        assert not out.exists() or overwrite  # a killed run never leaves something that looks sealed
    res = CliRunner().invoke(cli, _args(out, overwrite))
    if point == "artifact.sealed":  # killed after its last rename: the job is finished, and says so
        assert res.exit_code == 2, res.output
        assert "already holds this job's sealed artifact; nothing to resume" in res.stderr
    else:
        assert res.exit_code == 0, (point, res.output)
        assert "Traceback" not in res.stderr
    _same_artifact(clean, out)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["art", "art.job"], left  # no .partial, .old-<pid> or .lock left behind


@pytest.mark.parametrize("point", ["quantize.layer-done#1", "random", "artifact.marker-removed",
                                   "artifact.old-moved"])
def test_kill_at_a_point_then_resume_is_byte_identical(clean, tmp_path, point):
    _kill_and_resume(clean, tmp_path, _random_write(clean, random.Random(10)) if point == "random" else point)


@pytest.mark.slow
def test_kill_at_every_named_point_and_random_writes(clean, tmp_path_factory):
    """~4 s per point (the killed subprocess's imports)."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    points = NAMED + [_random_write(clean, rng) for _ in range(5)]
    assert len(points) >= 10
    for point in points:
        _kill_and_resume(clean, tmp_path_factory.mktemp("kill"), point)
    print(f"killed and resumed at {len(points)} points: {', '.join(points)}")



def _killed_after_one_layer(tmp_path):
    out = tmp_path / "art"
    env = {**os.environ, "LANCE_DEPLOY_FAULT": "kill@quantize.layer-done#1"}
    proc = subprocess.run([sys.executable, "-m", "lance_deploy", *_args(out, False)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return out


def test_a_resume_takes_finished_layers_from_the_partial_artifact(clean, tmp_path):
    """Each layer is written once, into the artifact's shards: its job step keeps only the hashes
    (and hidden states / amax of calibrated recipes), so the job folder holds no second copy."""
    out = _killed_after_one_layer(tmp_path)
    steps = tmp_path / "art.job" / "steps"
    layer0 = steps / "layer-000.safetensors"
    assert layer0.stat().st_size < 4096  # the layer's packed weights are ~1 MB; the step holds its hashes
    assert list((tmp_path / "art.partial" / "weights").glob(".*.part"))  # the killed run's shards, kept
    res = CliRunner().invoke(cli, _args(out, False))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["resumed_layers"] == 1 and "resumed the unsealed folder" in res.stderr
    _same_artifact(clean, out)


def test_a_changed_byte_in_a_kept_shard_is_refused_with_a_fix(tmp_path):
    out = _killed_after_one_layer(tmp_path)
    part = next(p for p in (tmp_path / "art.partial" / "weights").glob(".und-*.part"))
    data = bytearray(part.read_bytes())
    data[-1024] ^= 0xFF  # inside layer 0's tensors (the shard's file ends where its last write did)
    part.write_bytes(bytes(data))
    res = CliRunner().invoke(cli, _args(out, False))
    assert res.exit_code != 0 and "Traceback" not in res.stderr
    assert "no longer holds the bytes this job wrote; pass --restart" in res.stderr
    res = CliRunner().invoke(cli, [*_args(out, False), "--restart"])
    assert res.exit_code == 0, res.output
    with ArtifactReader(out) as r:
        r.verify()
