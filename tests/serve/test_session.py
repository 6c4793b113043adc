"""EditSession: each turn edits an earlier output; the folder replays any turn bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_util import SIDE, gradient

from lance_deploy.api import EditSession
from lance_deploy.core.errors import LanceUsageError

OPTS = {"steps": 2, **SIDE}


class Locked:
    """The shared engine as a pipeline that takes its lock (server workers use the same model)."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, req, progress=False):
        return self.engine.run(req)


def test_turns_chain_branch_reopen_and_replay_exactly(engine, tmp_path):
    pipe = Locked(engine)
    s = EditSession.create(tmp_path / "s", gradient())
    t1 = s.edit(pipe, "add snow", seed=1, **OPTS)
    t2 = s.edit(pipe, "make it night", seed=2, **OPTS)
    t3 = s.edit(pipe, "paint it red", parent=1, seed=3, **OPTS)
    assert [(t.index, t.parent) for t in (t1, t2, t3)] == [(1, 0), (2, 1), (3, 1)]

    again = EditSession.open(tmp_path / "s")
    assert [t.prompt for t in again.turns] == [None, "add snow", "make it night", "paint it red"]
    assert [t.seed for t in again.turns] == [None, 1, 2, 3]
    assert again.turns[2].input == "turn_001.png" and again.turns[3].input == "turn_001.png"
    saved = json.loads((tmp_path / "s" / "session.json").read_text())
    assert saved["turns"][2]["params"]["sampler"]["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "session.json", "turn_000.png", "turn_001.png", "turn_002.png", "turn_003.png"]  # no temporaries

    assert again.verify(pipe, 2) and again.verify(pipe, 3)  # bit for bit from the stored input and params
    other = again.replay_request(2)
    other.seed = 99
    assert not np.array_equal(pipe(other).frames[0], again.image(2))  # the check can fail


def test_record_refuses_a_request_on_another_turns_image(engine, tmp_path):
    s = EditSession.create(tmp_path / "s", gradient())
    s.edit(Locked(engine), "add snow", **OPTS)
    req = s.request("again", parent=0, **OPTS)
    with pytest.raises(LanceUsageError, match="not turn 1's output"):
        s.record(req, gradient(), parent=1)
    with pytest.raises(LanceUsageError, match="not empty"):
        EditSession.create(tmp_path / "s", gradient())
    with pytest.raises(LanceUsageError, match="turn 7"):
        s.input_image(7)


def clip(frames: int = 17) -> np.ndarray:
    return np.stack([np.roll(gradient(), 3 * i, axis=1) for i in range(frames)])


def test_video_session_chains_branches_and_replays_exactly(engine, tmp_path):
    pipe = Locked(engine)
    s = EditSession.create(tmp_path / "v", video=clip(), fps=24)
    assert s.task == "video_edit" and s.turns[0].fps == 24.0
    t1 = s.edit(pipe, "add snow", seed=1, **OPTS)
    t2 = s.edit(pipe, "make it night", seed=2, **OPTS)
    t3 = s.edit(pipe, "paint it red", parent=1, seed=3, **OPTS)
    assert [(t.index, t.parent, t.fps) for t in (t1, t2, t3)] == [(1, 0, 12.0), (2, 1, 12.0), (3, 1, 12.0)]

    again = EditSession.open(tmp_path / "v")
    frames, fps = again.input_video(1)
    assert frames.shape == (5, 64, 64, 3) and fps == 12.0  # 17 frames at 24 fps -> 5 at the model's 12
    req = again.request("x", parent=1, **OPTS)
    assert np.array_equal(req.video, np.load(tmp_path / "v" / "turn_001.npy", allow_pickle=False))
    assert req.video_fps == 12.0 and again.replay_request(1).video_fps == 24.0
    names = sorted(p.name for p in (tmp_path / "v").iterdir())
    assert names == ["session.json"] + [f"turn_00{i}.{x}" for i in range(4) for x in ("mp4", "npy")]
    assert again.view_path(2).suffix == ".mp4" and again.path(2).suffix == ".npy"
    assert again.turns[3].input == "turn_001.npy"

    assert again.verify(pipe, 3)  # a branch, from a stored .npy input
    other = again.replay_request(3)
    other.seed = 99
    assert not np.array_equal(pipe(other).frames, again.media(3))
    with pytest.raises(LanceUsageError, match="a video session"):
        again.image(1)
    with pytest.raises(LanceUsageError, match="holds video_edit turns; a image_edit request"):
        again.record(EditSession.create(tmp_path / "i", gradient()).request("y", **OPTS), frames, parent=1)


def test_video_session_refuses_bad_sources_and_reads_format_1(tmp_path):
    with pytest.raises(LanceUsageError, match="frame rate"):
        EditSession.create(tmp_path / "a", video=clip(), fps=None)
    with pytest.raises(LanceUsageError, match=r"uint8 \[N, H, W, 3\]"):
        EditSession.create(tmp_path / "b", video=gradient(), fps=12)
    with pytest.raises(LanceUsageError, match="give the source image"):
        EditSession.create(tmp_path / "c", gradient(), video=clip(), fps=12)
    s = EditSession.create(tmp_path / "old", gradient())
    data = json.loads((tmp_path / "old" / "session.json").read_text())
    data = {"format": 1, "turns": [{k: v for k, v in t.items() if k not in ("view", "fps")} for t in data["turns"]]}
    (tmp_path / "old" / "session.json").write_text(json.dumps(data))
    old = EditSession.open(tmp_path / "old")
    assert old.task == "image_edit" and np.array_equal(old.image(0), s.image(0))
    (tmp_path / "v").mkdir()
    v = EditSession.create(tmp_path / "v", video=clip(5), fps=12)
    np.save(tmp_path / "v" / "turn_000.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LanceUsageError, match="not a readable .npy"):
        v.media(0)  # a pickled array is refused, never loaded
