"""The bounded queue: 429 with Retry-After when full, cancel (queued: at once; running: at the next
step boundary), a job that waited past its timeout is dropped, and the worker survives all of it."""

from __future__ import annotations

import json
import threading
import time

import httpx
from serve_util import FAST, live_server

LONG = {"prompt": "a long one", "size": "64x64", "frames": 5, "steps": 1000}  # minutes on CPU: always cancelled


def _wait_for_step(c: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    """Read the job's SSE stream until its first step event (the job is running)."""
    deadline = time.monotonic() + timeout
    with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as s:
        for line in s.iter_lines():
            if time.monotonic() > deadline:
                break
            if line.startswith("data:") and json.loads(line[5:])["status"] == "running" and '"step"' in line:
                return json.loads(line[5:])
    raise AssertionError(f"job {job_id} did not start a step within {timeout} s")


def _wait_done(c: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def test_full_queue_429_then_cancel_queued_and_running(engine, ckpt, tmp_path):
    with live_server(engine, ckpt, tmp_path, queue_size=1) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        running = c.post("/v1/videos", json=LONG).json()["id"]
        _wait_for_step(c, running)
        waiting = c.post("/v1/videos", json=LONG)
        assert waiting.status_code == 202 and waiting.json()["status"] == "queued"
        for full in (c.post("/v1/videos", json=LONG),
                     c.post("/v1/images/generations", json={"prompt": "x", "size": "32x32", **FAST})):
            assert full.status_code == 429, full.text
            assert int(full.headers["retry-after"]) >= 1
            assert "queue is full" in full.json()["error"]["message"]
        # the queued job ends at once ...
        r = c.delete(f"/v1/jobs/{waiting.json()['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        # ... the running one at its next step boundary
        r = c.delete(f"/v1/jobs/{running}")
        assert r.status_code == 200 and r.json()["cancel_requested"]
        job = _wait_done(c, running)
        assert job["status"] == "cancelled" and 1 <= job["progress"]["step"] < 1000
        assert job["error"]["message"].startswith("cancelled at step")
        assert not list((tmp_path / "results").iterdir())  # nothing half-written for the cancelled jobs
        h = c.get("/healthz").json()
        assert h["status"] == "ok" and h["worker_alive"] and h["queue"]["waiting"] == 0
        ok = c.post("/v1/images/generations", json={"prompt": "after", "size": "32x32", **FAST})
        assert ok.status_code == 200, ok.text


def test_a_job_that_waited_past_its_timeout_is_dropped(engine, ckpt, tmp_path):
    with live_server(engine, ckpt, tmp_path, queue_size=4, queue_timeout_s=1.0) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        running = c.post("/v1/videos", json=LONG).json()["id"]
        _wait_for_step(c, running)
        late = c.post("/v1/videos", json={"prompt": "late", "size": "32x32", "frames": 1, **FAST}).json()["id"]
        sync: dict = {}

        def blocking_call():  # an image request waiting for its result when it is dropped
            with httpx.Client(base_url=live.url, timeout=60) as c2:
                sync["r"] = c2.post("/v1/images/generations", json={"prompt": "late", "size": "32x32", **FAST})

        t = threading.Thread(target=blocking_call)
        t.start()
        time.sleep(1.5)  # both now waited longer than the 1 s limit
        c.delete(f"/v1/jobs/{running}")
        job = _wait_done(c, late)
        assert job["status"] == "expired" and "over the server's 1 s limit" in job["error"]["message"]
        t.join(60)
        assert sync["r"].status_code == 503 and "dropped: waited" in sync["r"].json()["error"]["message"]
        assert "retry-after" in sync["r"].headers
        assert c.get("/healthz").json()["worker_alive"]
