"""Issue 14's first defect: a bad request on a full-size release is refused before any weight is read.

The release is header-only (full shapes, a few KB on disk); loading is replaced by a failure, so a
refusal that came after the load would show as that failure instead of the one-line usage error."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from lance_deploy.checkpoint.headers_only import make_header_only_release

    return make_header_only_release(tmp_path_factory.mktemp("full"), golden_root() / "ckpt" / "Lance_3B")


@pytest.mark.parametrize("args, expected", [
    (["t2i", "--height", "64", "--width", "64"], "--prompt"),
    (["t2i", "--prompt", "a boat", "--steps", "0"], "--steps"),
    (["t2i", "--prompt", "a boat", "--height", "63"], "--height"),
    (["t2v", "--prompt", "waves", "--frames", "500"], "--frames"),
    (["t2i", "--prompt", "a boat", "--out", "no/such/folder/boat.png"], "--out"),
    (["x2t_image", "--question", "what?"], "--image"),
])
def test_refused_in_seconds_without_loading(release, monkeypatch, tmp_path, args, expected):
    from lance_deploy.pipeline import pipeline

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the request was checked")

    monkeypatch.setattr(pipeline.LancePipeline, "from_path", classmethod(no_load))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["run", *args, "--model", str(release), "--device", "cpu"])
    elapsed = time.perf_counter() - start
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert elapsed < 5, f"refused after {elapsed:.1f} s"
