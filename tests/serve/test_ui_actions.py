"""The UI's edit-session actions on the server's own queue: a video session whose turns chain,
branch and replay exactly (the job keeps its lossless frames), and one-line errors for bad sources."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from serve_util import gradient

from lance_deploy.serve.jobs import SUCCEEDED
from lance_deploy.serve.scheduler import LocalScheduler
from lance_deploy.serve.ui_actions import Actions, UIError, history


class Locked:
    def __init__(self, engine):
        self.engine = engine

    def __call__(self, req, progress=False):
        return self.engine.run(req)


def _clip_file(tmp_path, n: int = 9):
    from lance_deploy.media.io import write_video

    path = tmp_path / "clip.mp4"
    write_video(np.stack([np.roll(gradient(), 4 * i, axis=1) for i in range(n)]), path, fps=12)
    return str(path)


async def _turn(act, session, parent, prompt, seed, keep_frames=True):
    req = act.edit_request(session, parent, prompt, seed, 2, 4.0, 64)
    async for _line, job, e in act.follow(req, keep_frames=keep_frames):
        if e.terminal:
            assert job.status == SUCCEEDED, job.error
            return job, await asyncio.to_thread(act.record, session, req, job, parent)


@pytest.fixture
def actions(engine, tmp_path):
    sched = LocalScheduler(engine, tmp_path / "out", queue_size=4).start()
    yield Actions(sched, tmp_path / "out")
    sched.stop()


def test_video_session_through_the_queue(actions, engine, tmp_path):
    async def scenario():
        session = await actions.session(None, None, "video", _clip_file(tmp_path))
        job, one = await _turn(actions, session, None, "add snow", 1)
        _, two = await _turn(actions, session, 0, "make it night", 2)  # a branch from the source
        return session, job, (one, two)

    session, job, indices = asyncio.run(scenario())
    assert indices == (1, 2) and session.is_video
    kept = next(n for n in job.result["files"] if n.endswith(".npy"))
    assert np.array_equal(np.load(actions.s.store.path(kept), allow_pickle=False), session.media(1))
    strip = history(session)
    assert [p.rsplit(".", 1)[1] for p, _ in strip] == ["mp4"] * 3
    assert strip[2][1] == "turn 2: make it night (from turn 0)" and strip[0][1] == "turn 0: source"
    assert session.verify(Locked(engine), 1)  # what the queue made replays exactly


def test_bad_sources_and_lossy_results_are_one_line_errors(actions, tmp_path):
    async def scenario():
        with pytest.raises(UIError, match="upload a source video"):
            await actions.session(None, None, "video", None)
        with pytest.raises(UIError, match="upload a source image"):
            await actions.session(None, None, "image", None)
        (tmp_path / "junk.mp4").write_bytes(b"not a video")
        with pytest.raises(UIError, match="junk.mp4"):
            await actions.session(None, None, "video", str(tmp_path / "junk.mp4"))
        with pytest.raises(UIError, match="not an edit session"):
            await actions.session(str(tmp_path), None, "video", None)
        session = await actions.session(None, None, "video", _clip_file(tmp_path))
        with pytest.raises(UIError, match="kept no lossless frames"):
            await _turn(actions, session, None, "add snow", 1, keep_frames=False)
        return session

    session = asyncio.run(scenario())
    assert len(session.turns) == 1  # the refused turn was not recorded


def test_ui_builds_with_a_video_session_kind(actions):
    pytest.importorskip("gradio")
    from lance_deploy.serve.ui import build_ui

    ui = build_ui(actions.s, actions.sessions.parent)
    ids = {getattr(b, "elem_id", None): b for b in ui.blocks.values()}
    assert {"edit-kind", "edit-source-video", "edit-result-video", "edit-history"} <= set(ids)
    assert ids["edit-kind"].choices == [("image", "image"), ("video", "video")]


def test_the_negative_prompt_fields_reach_the_request(actions):
    assert actions.t2i("a boat", 64, 64, 1, 2, 4.0, "  blurry ").negative_prompt == "blurry"
    assert actions.t2i("a boat", 64, 64, 1, 2, 4.0, "").negative_prompt is None  # upstream's uncond branch
    assert actions.t2i("a boat", 64, 64, 1, 2, 4.0).negative_prompt is None
    req = asyncio.run(actions.video("t2v", "a boat", None, None, 64, 64, 5, 1, 2, 4.0, 0, "static"))
    assert req.negative_prompt == "static"


def test_a_generated_video_starts_a_session_from_its_exact_frames(actions):
    async def scenario():
        req = await actions.video("t2v", "waves", None, None, 32, 32, 5, 3, 2, 4.0, 0)
        async for _line, job, e in actions.follow(req, keep_frames=True):
            if e.terminal:
                frames = actions.kept_frames(job)
        session = await actions.session(None, None, "video", None, frames)
        _, index = await _turn(actions, session, None, "add snow", 1)
        return frames, session, index

    frames, session, index = asyncio.run(scenario())
    assert session.is_video and index == 1
    assert np.array_equal(session.media(0), np.load(frames, allow_pickle=False))
