"""artifact/partial.py: leftovers of a killed writer are recognised by what they hold."""

from __future__ import annotations

import json
import shutil

import pytest

from lance_deploy.artifact.manifest import ArtifactError
from lance_deploy.artifact.partial import PARTIAL_MARKER, clear_partial, recover_swap, remove_partial


def _artifact(path, created="t0"):
    (path / "weights").mkdir(parents=True)
    (path / "weights" / "shared.safetensors").write_bytes(b"x")
    (path / "manifest.json").write_text(json.dumps({"producer": {"name": "lance-deploy"}, "source": {"f": 1},
                                                    "recipe": {"name": "r"}, "created": created}))
    return path


def test_swap_killed_between_renames_puts_the_old_artifact_back(tmp_path):
    out = tmp_path / "art"
    _artifact(tmp_path / "art.old-4242")
    assert "put back the previous artifact from art.old-4242" in recover_swap(out)
    assert (out / "manifest.json").is_file() and not (tmp_path / "art.old-4242").exists()
    _artifact(tmp_path / "art.old-99")  # OUT is whole: the leftover is the replaced one, half removed
    assert "removed art.old-99" in recover_swap(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert recover_swap(out) is None


def test_ownership_is_proved_by_the_manifest(tmp_path):
    out, partial = tmp_path / "art", tmp_path / "art.partial"
    owner = {"source": {"f": 1}, "recipe": {"name": "r"}, "created": "t0"}
    _artifact(partial)
    with pytest.raises(ArtifactError, match="a complete artifact .recipe 'r', created t0. whose final rename never "
                                            "happened, made from another source or recipe than this run's"):
        clear_partial(partial, out, {**owner, "source": {"f": 2}})
    assert (partial / "manifest.json").is_file()  # refused, and left as it was
    assert "this job's finished artifact" in clear_partial(partial, out, owner)
    assert not partial.exists()
    _artifact(partial)  # its job folder is gone: a rebuild of the same source and recipe gives the same weights
    assert "an earlier job's (same source and recipe, created t0) finished artifact" in clear_partial(
        partial, out, {**owner, "created": "t1"})
    assert not partial.exists()


def test_removal_keeps_the_marker_to_the_end(tmp_path, monkeypatch):
    partial = _artifact(tmp_path / "art.partial")
    (partial / PARTIAL_MARKER).write_text("")

    def killed(path, *a, **k):
        raise OSError("killed mid-removal")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(OSError):
        remove_partial(partial)
    monkeypatch.undo()
    assert (partial / PARTIAL_MARKER).is_file()  # still recognisably ours
    assert "unsealed folder of an interrupted run" in clear_partial(partial, tmp_path / "art", None)
    assert not partial.exists()
