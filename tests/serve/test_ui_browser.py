"""The web UI in a real browser (Debian's chromium via Playwright): t2i, an edit, a second edit on
that output, a branch, a video edit session with a branch, an x2t question and a short t2v. Screenshots go to tests/serve/artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_util import ARTIFACTS, live_server, mp4_bytes, png_bytes

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT = 120_000  # ms, per wait: CI machines are slow and shared


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); Playwright's own download "
                    "cannot be fetched here")
    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("gradio")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _fill(page, elem_id: str, value) -> None:
    page.fill(f"#{elem_id} input, #{elem_id} textarea", str(value))


def _done(page, elem_id: str) -> str:
    page.wait_for_function(f"document.querySelector('#{elem_id}')?.innerText.includes('done')", timeout=TIMEOUT)
    return page.inner_text(f"#{elem_id}")


def test_ui_drives_every_kind_of_task(browser, engine, ckpt, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    source = tmp_path / "source.png"
    source.write_bytes(png_bytes())
    with live_server(engine, ckpt, tmp_path / "out", ui=True) as live:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(f"{live.url}/ui/", timeout=TIMEOUT)
        page.wait_for_selector("#t2i-prompt textarea", timeout=TIMEOUT)

        # text to image
        _fill(page, "t2i-prompt", "a red boat")
        for k, v in (("width", 64), ("height", 64), ("steps", 2)):
            _fill(page, f"t2i-{k}", v)
        page.click("#t2i-go")
        assert "seed 42" in _done(page, "t2i-status")
        page.wait_for_selector("#t2i-image img", timeout=TIMEOUT)
        page.screenshot(path=str(ARTIFACTS / "ui_t2i.png"), full_page=True)

        # an edit of the generated image, a second edit on that output, then a branch from turn 1
        page.get_by_role("tab", name="Edit session").click()
        page.click("#edit-take")
        page.wait_for_selector("#edit-source img", timeout=TIMEOUT)
        _fill(page, "edit-steps", 2)
        _fill(page, "edit-side", 64)
        for turn, text in ((1, "add snow"), (2, "make it night")):
            _fill(page, "edit-prompt", text)
            page.click("#edit-go")
            page.wait_for_function(f"document.querySelector('#edit-branch')?.innerText.includes('turn {turn}')",
                                   timeout=TIMEOUT)
        strip = page.locator("#edit-history")
        assert strip.locator("img").count() == 3  # the source and both turns
        captions = strip.inner_text()
        assert "turn 1: add snow" in captions and "turn 2: make it night" in captions
        assert page.locator("#edit-download").is_visible()
        page.screenshot(path=str(ARTIFACTS / "ui_edit_two_turns.png"), full_page=True)
        strip.locator("img").nth(1).click()  # branch from turn 1
        page.wait_for_function("document.querySelector('#edit-branch')?.innerText.includes('branches from turn 1')",
                               timeout=TIMEOUT)
        _fill(page, "edit-prompt", "paint it red")
        page.click("#edit-go")
        page.wait_for_function("document.querySelector('#edit-history')?.innerText.includes('(from turn 1)')",
                               timeout=TIMEOUT)
        session = next((live.out / "sessions").iterdir())
        assert sorted(p.name for p in session.glob("turn_*.png")) == [f"turn_00{i}.png" for i in range(4)]

        # a video session: an edit of an uploaded clip, then a branch from the source
        (tmp_path / "clip.mp4").write_bytes(mp4_bytes(tmp_path))
        page.locator("#edit-kind label", has_text="video").click()
        page.set_input_files("#edit-source-video input[type=file]", str(tmp_path / "clip.mp4"))
        page.wait_for_selector("#edit-source-video video", timeout=TIMEOUT)
        _fill(page, "edit-prompt", "add snow")
        page.click("#edit-go")
        page.wait_for_function("document.querySelector('#edit-branch')?.innerText.includes('turn 1')", timeout=TIMEOUT)
        page.wait_for_selector("#edit-result-video video[src]", timeout=TIMEOUT)
        strip.locator(".thumbnail-item").first.click()  # branch from the source clip
        page.wait_for_function("document.querySelector('#edit-branch')?.innerText.includes('branches from turn 0')",
                               timeout=TIMEOUT)
        _fill(page, "edit-prompt", "make it night")
        page.click("#edit-go")
        page.wait_for_function("document.querySelector('#edit-history')?.innerText.includes('(from turn 0)')",
                               timeout=TIMEOUT)
        page.screenshot(path=str(ARTIFACTS / "ui_edit_video.png"), full_page=True)
        video = next(p for p in (live.out / "sessions").iterdir() if (p / "turn_000.npy").exists())
        assert sorted(p.name for p in video.glob("turn_*.npy")) == [f"turn_00{i}.npy" for i in range(3)]

        # a question about an image
        page.get_by_role("tab", name="Ask").click()
        page.set_input_files("#ask-image input[type=file]", str(source))
        page.wait_for_selector("#ask-image img", timeout=TIMEOUT)
        _fill(page, "ask-question", "What is shown?")
        _fill(page, "ask-tokens", 6)
        _fill(page, "ask-side", 64)
        page.click("#ask-go")
        _done(page, "ask-status")
        assert page.input_value("#ask-answer textarea") != ""

        # a short text-to-video
        page.get_by_role("tab", name="Video").click()
        _fill(page, "video-prompt", "waves at dusk")
        for k, v in (("width", 64), ("height", 64), ("frames", 5), ("steps", 2)):
            _fill(page, f"video-{k}", v)
        page.click("#video-go")
        _done(page, "video-status")
        page.wait_for_selector("#video-result video[src]", timeout=TIMEOUT)
        page.screenshot(path=str(ARTIFACTS / "ui_t2v.png"), full_page=True)
        assert len(list((live.out / "results").glob("*.mp4"))) == 3  # the two video edits and the t2v

        # the generated video starts a new video session from its exact frames, not its MP4
        page.get_by_role("tab", name="Edit session").click()
        page.click("#edit-take")
        page.wait_for_selector("#edit-source-video video[src]", timeout=TIMEOUT)
        _fill(page, "edit-prompt", "add birds")
        page.click("#edit-go")
        page.wait_for_function("document.querySelector('#edit-branch')?.innerText.includes('turn 1')", timeout=TIMEOUT)
        kept = list((live.out / "results").glob("*.npy"))  # exact frames of each video job
        sessions = [p for p in (live.out / "sessions").iterdir() if (p / "turn_000.npy").exists()]
        taken = [p for p in sessions if p != video]
        assert len(taken) == 1 and (taken[0] / "turn_001.npy").exists()
        first = np.load(taken[0] / "turn_000.npy", allow_pickle=False)
        assert any(np.array_equal(first, np.load(p, allow_pickle=False)) for p in kept)  # an MP4 decode would differ
        page.close()
    shutil.rmtree(live.out / "sessions", ignore_errors=True)
