"""A table of bad requests: each gets its 4xx with a one-line OpenAI-style error, and the worker
thread is still the same live thread afterwards (no crash, nothing queued by mistake)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from serve_util import FAST, SIDE, chat_body, data_url, live_server, mp4_bytes, png_bytes

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
CHAT = "/v1/chat/completions"
VIDEO = "/v1/videos"
LIMIT = 1 << 20  # the server below takes bodies up to 1 MiB


def _big_png() -> bytes:
    """A 9000x9000 black PNG: small on the wire, 81 M pixels decoded (over the media reader's cap)."""
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _edit(image=("in.png", png_bytes(), "image/png"), **fields):
    data = {"prompt": "add snow", "steps": "2", **{k: str(v) for k, v in SIDE.items()}, **fields}
    return {"files": {"image": image} if image else None, "data": data}


def _cases(tmp):
    still = mp4_bytes(tmp, frames=1)
    good_png = data_url(png_bytes())
    return [
        # (name, method, path, httpx kwargs, status, words in the message)
        ("size not /16", "POST", GEN, {"json": {"prompt": "x", "size": "70x64"}}, 400, "width 70"),
        ("size shape", "POST", GEN, {"json": {"prompt": "x", "size": "big"}}, 400, "WIDTHxHEIGHT"),
        ("unknown field", "POST", GEN, {"json": {"prompt": "x", "bogus": 1}}, 400, "unknown field 'bogus'"),
        ("wrong type", "POST", GEN, {"json": {"prompt": "x", "steps": "many"}}, 400, "steps: Input should be"),
        ("missing prompt", "POST", GEN, {"json": {"size": "64x64"}}, 400, "missing field 'prompt'"),
        ("zero steps", "POST", GEN, {"json": {"prompt": "x", "steps": 0}}, 400, "steps 0"),
        ("too many steps", "POST", GEN, {"json": {"prompt": "x", "steps": 5000}}, 400, "from 1 to 1000"),
        ("negative cfg", "POST", GEN, {"json": {"prompt": "x", "cfg": -1}}, 400, "cfg -1"),
        ("negative seed", "POST", GEN, {"json": {"prompt": "x", "seed": -5}}, 400, "seed -5"),
        ("n > 1", "POST", GEN, {"json": {"prompt": "x", "n": 2}}, 400, "n 2"),
        ("unknown preset", "POST", GEN, {"json": {"prompt": "x", "resolution": "8k"}}, 400, "resolution '8k'"),
        ("prompt too long", "POST", GEN, {"json": {"prompt": "x" * 9000}}, 400, "9,000 characters"),
        ("unknown model", "POST", GEN, {"json": {"prompt": "x", "model": "gpt-image-1"}}, 404, "not served here"),
        ("not JSON", "POST", GEN, {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400,
         "not valid JSON"),
        ("JSON list", "POST", GEN, {"json": ["prompt"]}, 400, "JSON object"),
        ("wrong content type", "POST", GEN, {"content": b"prompt=x", "headers": {"content-type": "text/plain"}}, 415,
         "application/json"),
        ("body too large", "POST", GEN, {"json": {"prompt": "x" * (LIMIT + 10)}}, 413, "limit"),
        ("edit as JSON", "POST", EDIT, {"json": {"prompt": "x"}}, 415, "multipart/form-data"),
        ("edit without image", "POST", EDIT, _edit(image=None), 400, "no image file part"),
        ("edit text as image", "POST", EDIT, _edit(image=("a.txt", b"hello", "text/plain")), 415, "expected an image"),
        ("edit undecodable", "POST", EDIT, _edit(image=("a.png", b"\x89PNG garbage", "image/png")), 400,
         "cannot decode image"),
        ("edit too many pixels", "POST", EDIT, _edit(image=("big.png", _big_png(), "image/png")), 400, "pixels"),
        ("edit with a size", "POST", EDIT, _edit(size="64x64"), 400, "keeps the input's aspect"),
        ("edit unknown field", "POST", EDIT, _edit(mask="yes"), 400, "unknown field 'mask'"),
        ("chat http URL", "POST", CHAT, {"json": chat_body("https://example.com/cat.png")}, 400, "fetches nothing"),
        ("chat bad base64", "POST", CHAT, {"json": chat_body("data:image/png;base64,@@@")}, 400, "base64"),
        ("chat no media", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}]}}, 400,
         "exactly one"),
        ("chat two turns", "POST", CHAT, {"json": {"messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]}}, 400, "one user message"),
        ("chat unknown part", "POST", CHAT, {"json": {"messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}}, 400, "messages"),
        ("chat zero tokens", "POST", CHAT, {"json": chat_body(good_png, max_tokens=0)}, 400, "max_new_tokens 0"),
        ("chat garbage video", "POST", CHAT, {"json": chat_body(data_url(b"not a video" * 50, "video/mp4"),
                                                                "video_url")}, 400, "cannot decode video"),
        ("frames too many", "POST", VIDEO, {"json": {"prompt": "x", "frames": 200}}, 400, "frames 200"),
        ("frames zero", "POST", VIDEO, {"json": {"prompt": "x", "frames": 0}}, 400, "frames 0"),
        ("t2v size not /16", "POST", VIDEO, {"json": {"prompt": "x", "size": "40x40"}}, 400, "multiple of 16"),
        ("t2v with image", "POST", VIDEO, {"json": {"prompt": "x", "task": "t2v", "image": good_png}}, 400,
         "takes no input image"),
        ("video_edit of a still", "POST", VIDEO, {"json": {"prompt": "x", "video": data_url(still, "video/mp4"),
                                                           **FAST, **SIDE}}, 400, "edits a video"),
        ("unknown task", "POST", VIDEO, {"json": {"prompt": "x", "task": "t2a"}}, 400, "task"),
        ("cancel unknown job", "DELETE", "/v1/jobs/job_00000000000000000000", {}, 404, "unknown job"),
        ("wrong method", "GET", GEN, {}, 405, "not allowed"),
    ]


@pytest.fixture(scope="module")
def strict_server(engine, ckpt, tmp_path_factory):
    with live_server(engine, ckpt, tmp_path_factory.mktemp("strict"), max_upload_bytes=LIMIT) as live:
        yield live


def test_each_bad_input_gets_its_4xx_and_the_worker_survives(strict_server, tmp_path):
    import httpx

    worker = strict_server.scheduler._thread
    failures = []
    with httpx.Client(base_url=strict_server.url, timeout=60) as c:
        for name, method, path, kwargs, status, words in _cases(tmp_path):
            r = c.request(method, path, **kwargs)
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                failures.append(f"{name}: {r.status_code} without an error body: {r.text[:200]}")
                continue
            if r.status_code != status or words not in message or "\n" in message:
                failures.append(f"{name}: got {r.status_code} {message!r}, expected {status} with {words!r}")
        assert not failures, "\n".join(failures)
        h = c.get("/healthz").json()
        assert h["worker_alive"] and strict_server.scheduler._thread is worker
        assert h["queue"]["waiting"] == 0 and h["completed"] == 0  # none of them reached the model
        r = c.post(GEN, json={"prompt": "still fine", "size": "32x32", **FAST})
        assert r.status_code == 200
        png = base64.b64decode(r.json()["data"][0]["b64_json"])
        assert np.asarray(Image.open(io.BytesIO(png))).shape == (32, 32, 3)
