"""`run image_edit|video_edit --continue DIR`: turns chain and branch, every turn replays bit for bit,
and every bad use is one usage line (exit 2) before a byte of weights is read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.api import EditSession
from lance_deploy.cli import cli

FAST = ["--steps", "1", "--vae-area-side", "64", "--vit-area-side", "64", "--device", "cpu", "--quiet"]


def _gradient() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([x * 4, y * 4, (x + y) % 256], -1).astype(np.uint8)


def _clip(n: int = 17) -> np.ndarray:
    return np.stack([np.roll(_gradient(), 3 * i, axis=1) for i in range(n)])


def _run(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, ["run", *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def _usage_error(args, match: str) -> None:
    code, _, err = _run(*args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), err
    assert match in lines[0], lines[0]


def _source(tmp_path):
    from lance_deploy.media.io import write_image

    write_image(_gradient(), tmp_path / "src.png")
    return tmp_path / "src.png"


@pytest.mark.slow  # a model load per turn: 100-115 s on the shared 2-core box
def test_image_turns_chain_branch_and_replay_bit_for_bit(tmp_path):
    model = golden_root() / "ckpt" / "Lance_3B"
    folder = tmp_path / "boat"
    turns = [("--image", _source(tmp_path), "--prompt", "add snow", "--seed", 1),
             ("--prompt", "make it night", "--seed", 2),
             ("--parent", 1, "--prompt", "paint it red", "--seed", 3, "--json")]
    outs = []
    for extra in turns:
        code, out, err = _run("image_edit", "--model", model, "--continue", folder, *FAST, *extra)
        assert code == 0, err
        outs.append(out)
    assert "turn 1 (edits turn 0)" in outs[0] and "turn 2 (edits turn 1)" in outs[1]
    last = json.loads(outs[2])
    assert (last["turn"], last["parent"], last["turns"], last["seed"]) == (3, 1, 4, 3)
    assert last["output"] == str(folder / "turn_003.png")

    s = EditSession.open(folder)
    assert [(t.parent, t.prompt) for t in s.turns] == [(None, None), (0, "add snow"), (1, "make it night"),
                                                         (1, "paint it red")]
    from lance_deploy.api import load_pipeline

    pipe = load_pipeline(model, "image_edit", device="cpu")
    assert s.verify(pipe, 1) and s.verify(pipe, 2) and s.verify(pipe, 3)  # the CLI's turns replay exactly
    other = s.replay_request(3)
    other.seed = 4
    assert not np.array_equal(pipe(other).frames[0], s.image(3))  # the comparison can fail


@pytest.mark.slow  # a model load per turn: 100-115 s on the shared 2-core box
def test_video_turns_store_frames_losslessly_and_replay_bit_for_bit(tmp_path):
    from lance_deploy.media.io import write_video

    model = golden_root() / "ckpt"
    write_video(_clip(), tmp_path / "clip.mp4", fps=24)
    folder = tmp_path / "waves"
    for extra in (("--video", tmp_path / "clip.mp4", "--prompt", "add snow"), ("--prompt", "make it night")):
        code, out, err = _run("video_edit", "--model", model, "--continue", folder, *FAST, *extra)
        assert code == 0, err
    assert "turn 2 (edits turn 1): wrote" in out and "turn_002.npy, 12 fps" in out

    s = EditSession.open(folder)
    assert s.task == "video_edit" and [t.fps for t in s.turns] == [24.0, 12.0, 12.0]
    frames, fps = s.input_video(2)
    assert frames.shape == (5, 64, 64, 3) and fps == 12.0
    assert np.array_equal(s.replay_request(2).video, s.media(1))  # turn 2's input is turn 1's exact output
    from lance_deploy.api import load_pipeline

    pipe = load_pipeline(model, "video_edit", device="cpu")
    assert s.verify(pipe, 1) and s.verify(pipe, 2)


def test_bad_uses_are_one_usage_line_before_loading(tmp_path):
    src = _source(tmp_path)
    nowhere = tmp_path / "no-model"  # never read: every refusal comes first
    img = tmp_path / "img"
    EditSession.create(img, _gradient())
    vid = tmp_path / "vid"
    EditSession.create(vid, video=_clip(5), fps=12)
    (tmp_path / "file").write_text("x")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    base = ["--model", nowhere, "--prompt", "x", *FAST]
    cases = [
        (["t2i", "--continue", img], "t2i makes no edit session"),
        (["image_edit", "--parent", 1], "--parent N needs --continue"),
        (["image_edit", "--continue", img, "--parent", 5], "--parent 5:"),
        (["image_edit", "--continue", img, "--parent", -1], "--parent -1: expected a turn number"),
        (["video_edit", "--continue", img], "holds image_edit turns; run `lance-deploy run image_edit"),
        (["image_edit", "--continue", vid], "holds video_edit turns"),
        (["image_edit", "--continue", tmp_path / "file"], "not a folder"),
        (["image_edit", "--continue", tmp_path / "junk"], "not an edit session"),
        (["image_edit", "--continue", tmp_path / "new"], "a new session; give --image FILE"),
        (["video_edit", "--continue", tmp_path / "new"], "a new session; give --video PATH"),
        (["image_edit", "--continue", tmp_path / "new", "--image", src, "--parent", 2], "only turn 0"),
        (["image_edit", "--continue", img, "--image", src], "--image: "),
        (["image_edit", "--continue", img, "--out", tmp_path / "o.png"], "--out: --continue writes each turn"),
        (["image_edit", "--continue", img, "--height", 64], "--height: not an option of an edit turn"),
        (["image_edit", "--continue", img, "--steps", 0], "--steps"),
        (["image_edit", "--continue", img, "--seeds", "1,2"], "--continue runs one turn"),
    ]
    for args, match in cases:
        _usage_error([*args[:1], *base, *args[1:]], match)
    assert not (tmp_path / "new").exists()  # a refused first turn leaves no session behind


def test_a_failed_first_turn_leaves_no_session(tmp_path):
    code, _, err = _run("image_edit", "--model", tmp_path / "no-model", "--continue", tmp_path / "s", "--image",
                        _source(tmp_path), "--prompt", "x", *FAST)
    assert code != 0 and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # the session is made only once its first turn has run


def test_a_second_writer_on_one_session_is_refused(tmp_path):
    """Two runs appending to one session would both take the next turn number: the second waits for nothing."""
    import subprocess
    import sys

    folder = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lance_deploy.core.lock import PathLock\n"
         f"with PathLock({str(folder)!r}, '--continue'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _usage_error(["image_edit", "--model", golden_root() / "ckpt", "--continue", folder, "--image",
                      _source(tmp_path), "--prompt", "x", *FAST], "--continue")
    finally:
        holder.kill()
        holder.wait()
    assert not folder.exists()
