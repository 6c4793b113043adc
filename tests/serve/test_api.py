"""Every endpoint against a live uvicorn on 127.0.0.1 with the tiny checkpoint."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from serve_util import FAST, SIDE, chat_body, data_url, mp4_bytes, png_bytes


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_health_and_models(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["worker_alive"] and h["model"] == "lance-3b-video"
    assert sorted(h["tasks"]) == sorted(["t2i", "t2v", "i2v", "image_edit", "video_edit", "x2t_image", "x2t_video"])
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "lance-3b-video"


def test_t2i_stores_png_with_its_parameters(client, server):
    r = client.post("/v1/images/generations", json={"prompt": "a red boat", "size": "64x48", "seed": 7, **FAST})
    assert r.status_code == 200, r.text
    body = r.json()
    img = _png(base64.b64decode(body["data"][0]["b64_json"]))
    assert img.size == (64, 48)
    meta = json.loads(img.text["lance-deploy"])  # the parameters travel inside the PNG (media.metadata)
    assert meta["seed"] == 7 and meta["params"]["prompt"] == "a red boat" and meta["params"]["sampler"]["steps"] == 2
    name = body["lance"]["files"][0]
    stored = client.get(f"/v1/results/{name}")
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/png"
    assert stored.content == base64.b64decode(body["data"][0]["b64_json"])
    assert (server.out / "results" / name).is_file()
    assert not [p for p in (server.out / "results").iterdir() if p.name.startswith(".")]  # no temporary left
    job = client.get(f"/v1/jobs/{body['lance']['job_id']}").json()
    assert job["status"] == "succeeded" and job["progress"] == {"step": 2, "total": 2}


def test_same_seed_same_pixels(client):
    body = {"prompt": "seeded", "size": "32x32", "seed": 3, "response_format": "url", **FAST}
    urls = [client.post("/v1/images/generations", json=body).json()["data"][0]["url"] for _ in range(2)]
    assert urls[0] != urls[1]
    a, b = (np.asarray(_png(client.get(u).content)) for u in urls)
    assert np.array_equal(a, b)


def test_image_edit_multipart(client):
    r = client.post("/v1/images/edits", files={"image": ("in.png", png_bytes(), "image/png")},
                    data={"prompt": "add snow", "steps": "2", "vae_area_side": "64", "vit_area_side": "64"})
    assert r.status_code == 200, r.text
    img = _png(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert img.size == (64, 64) and json.loads(img.text["lance-deploy"])["task"] == "image_edit"


def test_chat_image_question(client):
    r = client.post("/v1/chat/completions", json=chat_body(data_url(png_bytes())))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 0
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def _sse(lines) -> list[dict]:
    """SSE lines -> [{'event': ..., 'data': ..., 'id': ...}] (comment lines such as pings dropped)."""
    events, cur = [], {}
    for line in lines:
        if not line:
            if cur:
                events.append(cur)
            cur = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            cur[key] = value.lstrip(" ")
    if cur:
        events.append(cur)
    return events


def test_chat_stream_is_openai_chunks_and_matches_the_answer(client):
    body = chat_body(data_url(png_bytes()), max_tokens=8)
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1]["data"] == "[DONE]"
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole  # greedy: the streamed tokens are the same answer
    assert [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_chat_video_question(client, tmp_path):
    r = client.post("/v1/chat/completions", json=chat_body(data_url(mp4_bytes(tmp_path), "video/mp4"), "video_url"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_video_job_events_and_results(client):
    r = client.post("/v1/videos", json={"prompt": "waves", "size": "64x64", "frames": 5, **FAST})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}" and r.json()["status"] in ("queued", "running")
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        events = _sse(s.iter_lines())
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded", kinds
    steps = [json.loads(e["data"])["step"] for e in events if e["event"] == "step"]
    assert steps == [1, 2]
    assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
    job = client.get(f"/v1/jobs/{job_id}").json()
    mp4, sidecar = job["result"]["files"]
    video = client.get(f"/v1/results/{mp4}")
    assert video.headers["content-type"] == "video/mp4" and video.content[4:8] == b"ftyp"
    meta = client.get(f"/v1/results/{sidecar}").json()
    assert meta["job_id"] == job_id and meta["seed"] == 42 and meta["params"]["frames"] == 5
    # a late reader replays the log from any point (Last-Event-ID)
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": events[-2]["id"]}) as s:
        assert [e["event"] for e in _sse(s.iter_lines())] == ["succeeded"]
    # ... and one that has seen the end gets an empty stream, not a hang
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": events[-1]["id"]},
                       timeout=10) as s:
        assert _sse(s.iter_lines()) == []


def test_i2v_and_video_edit_jobs(client, tmp_path):
    i2v = client.post("/v1/videos", files={"input_reference": ("f.png", png_bytes(), "image/png")},
                      data={"prompt": "pan", "frames": "5", "steps": "2", **{k: str(v) for k, v in SIDE.items()}})
    edit = client.post("/v1/videos", json={"prompt": "snow", "video": data_url(mp4_bytes(tmp_path), "video/mp4"),
                                           **FAST, **SIDE})
    for r, task in ((i2v, "i2v"), (edit, "video_edit")):
        assert r.status_code == 202, r.text
        assert r.json()["task"] == task
    for r in (i2v, edit):
        with client.stream("GET", f"/v1/jobs/{r.json()['id']}/events") as s:
            assert _sse(s.iter_lines())[-1]["event"] == "succeeded"


@pytest.mark.parametrize("path", ["/v1/jobs/job_00000000000000000000", "/v1/jobs/nope/events",
                                  "/v1/results/job_00000000000000000000.png", "/v1/results/..%2Fsession.json",
                                  "/v1/nothing"])
def test_unknown_things_are_404_json(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_cancel_of_a_finished_job_is_409(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32", **FAST})
    job_id = r.json()["lance"]["job_id"]
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 409 and "already succeeded" in r.json()["error"]["message"]
