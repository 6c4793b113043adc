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
