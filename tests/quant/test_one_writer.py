"""One writer per artifact, and truthful handling of what a killed run left at OUT.partial."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.artifact.reader import ArtifactReader
from lance_deploy.cli import cli


def _args(out, *extra) -> list[str]:
    return ["quantize", str(golden_root() / "ckpt" / "Lance_3B"), "--recipe", "int8-rtn", "--out", str(out),
            "--device", "cpu", *extra]


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def test_two_concurrent_quantize_runs_on_one_out(tmp_path):
    """Both start together; whichever locks first pauses after its first layer until the other has
    been refused (exit 2, one line naming the winner's pid), then finishes and seals."""
    out, go = tmp_path / "art", tmp_path / "go"
    env = {**os.environ, "LANCE_DEPLOY_FAULT": "wait@quantize.layer-done", "LANCE_DEPLOY_FAULT_GO": str(go)}
    procs = [subprocess.Popen([sys.executable, "-m", "lance_deploy", *_args(out, "--json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.time() + 240
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate()
        assert loser.returncode == 2, err
        line = _one_error_line(err)
        assert line.startswith(f"Error: --out {out}: another lance-deploy process is writing it (pid {winner.pid} ")
        assert line.endswith("wait for it to finish or choose another --out")
        go.touch()
        _, werr = winner.communicate(timeout=240)
        assert winner.returncode == 0, werr
    finally:
        go.touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    with ArtifactReader(out) as r:
        r.verify()  # every tensor's sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "art.job", "go"]  # locks removed


def test_partial_left_in_the_seal_window(tmp_path):
    """A sealed manifest in OUT.partial without the marker is exactly what a kill between the marker's
    removal and the final rename leaves. It is rebuilt: with its own job folder (whose finished layers
    were in the folder now cleared, so they are quantized again), and without one, where the same
    source and recipe give the same weights; a folder lance-deploy never made is refused as such."""
    out, partial = tmp_path / "art", tmp_path / "art.partial"
    runner = CliRunner()
    assert runner.invoke(cli, _args(out)).exit_code == 0
    os.replace(out, partial)
    res = runner.invoke(cli, _args(out))
    assert res.exit_code == 0, res.output
    assert f"note: {partial}: this job's finished artifact, killed before its final rename; rebuilt" in res.stderr
    assert "layers resumed" not in res.stdout and not partial.exists()

    os.replace(out, partial)
    shards = {p.name: p.read_bytes() for p in (partial / "weights").iterdir()}
    shutil.rmtree(tmp_path / "art.job")  # without its job, the same source and recipe rebuild the same bytes
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["created"] = "2000-01-01T00:00:00+00:00"  # an earlier job, whatever second this one starts in
    (partial / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(cli, _args(out))
    assert res.exit_code == 0, res.output
    assert (f"note: {partial}: an earlier job's (same source and recipe, created 2000-01-01T00:00:00+00:00) "
            "finished artifact, killed before its final rename; rebuilt to the same weights") in res.stderr
    assert not partial.exists() and {p.name: p.read_bytes() for p in (out / "weights").iterdir()} == shards

    shutil.rmtree(out)
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    res = runner.invoke(cli, _args(out))
    assert res.exit_code == 2
    assert _one_error_line(res.stderr) == (f"Error: {partial}: exists without the lance-deploy marker or manifest, "
                                           "so it was not made by lance-deploy; remove it or pick another --out")
    assert (partial / "notes.txt").read_text() == "mine"


def test_unsealed_partial_without_its_job_is_rebuilt_saying_so(tmp_path):
    out = tmp_path / "art"
    env = {**os.environ, "LANCE_DEPLOY_FAULT": "kill@quantize.layer-done#2"}
    proc = subprocess.run([sys.executable, "-m", "lance_deploy", *_args(out)], env=env, capture_output=True,
                          timeout=300)
    assert proc.returncode == -9 and (tmp_path / "art.partial" / ".lance-deploy-partial").is_file()
    shutil.rmtree(tmp_path / "art.job")
    res = CliRunner().invoke(cli, _args(out))
    assert res.exit_code == 0, res.output
    assert f"note: {tmp_path / 'art.partial'}: cleared the unsealed folder of an interrupted run" in res.stderr
    assert "resumed" not in res.stdout  # nothing to resume from: every layer recomputed
    with ArtifactReader(out) as r:
        r.verify()
