"""Ray Serve scale-out on loopback with a local Ray: 2 replicas of the tiny model behind Serve's HTTP
proxy, concurrent requests spread over both, and a killed replica replaced while each of its jobs
is run again elsewhere or fails with a clear message: nothing is lost silently."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from serve_util import FAST, free_socket

pytestmark = pytest.mark.slow  # a local Ray and two model replicas take about a minute to start on 2 cores
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


@pytest.fixture(scope="module")
def ray_url(ckpt, tmp_path_factory):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from lance_deploy.serve.ray_app import RayConfig, start

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # Serve's proxy binds it next
    config = RayConfig(model=ckpt, out=tmp_path_factory.mktemp("ray-out"), port=port, device="cpu", replicas=2,
                       min_replicas=2, max_replicas=2, queue_size=4)
    serve = start(config, log_fn=lambda s: None)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


async def _t2i(c: httpx.AsyncClient, seed: int) -> httpx.Response:
    return await c.post("/v1/images/generations", json={"prompt": f"boat {seed}", "size": "64x64", "seed": seed,
                                                        "steps": 8})


def test_concurrent_requests_spread_over_both_replicas(ray_url):
    async def run():
        async with httpx.AsyncClient(base_url=ray_url, timeout=180) as c:
            rs = await asyncio.gather(*[_t2i(c, i) for i in range(10)])
            assert [r.status_code for r in rs] == [200] * 10, [r.text[:200] for r in rs]
            jobs = [(await c.get(f"/v1/jobs/{r.json()['lance']['job_id']}")).json() for r in rs]
            files = [(await c.get(f"/v1/results/{j['result']['files'][0]}")).status_code for j in jobs]
            return {j["replica"] for j in jobs}, files

    replicas, files = asyncio.run(run())
    assert len(replicas) == 2, replicas
    assert files == [200] * 10  # stored by the ingress from the bytes each replica sent


def _job(url, job_id):
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()


def _events(url, job_id) -> list[str]:
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60) as s:
        return [line[7:] for line in s.iter_lines() if line.startswith("event: ")]


def test_a_killed_replica_is_replaced_and_its_jobs_rerun_or_fail_cleanly(ray_url):
    import ray

    long = {"prompt": "waves", "size": "64x64", "frames": 5, "steps": 40}
    ids = [httpx.post(f"{ray_url}/v1/videos", json=long, timeout=60).json()["id"] for _ in range(6)]
    deadline = time.monotonic() + 120
    victim, on_victim = None, []
    while victim is None and time.monotonic() < deadline:
        # a replica early in one of them, so that it is still running when the kill lands; the jobs it
        # holds are those not yet ended in the same snapshot (one that ended before the kill needs no rerun)
        snapshot = {i: _job(ray_url, i) for i in ids}
        early = [j for j in snapshot.values() if j["status"] == "running"
                 and 1 <= j["progress"]["step"] <= long["steps"] // 2]
        if early:
            victim = early[0]["replica"]
            on_victim = [i for i, j in snapshot.items() if j["replica"] == victim and j["status"] not in TERMINAL]
        time.sleep(0.1)
    assert victim, "no job started"
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(_job(ray_url, i)["status"] in TERMINAL for i in ids):
        time.sleep(0.5)
    jobs = {i: _job(ray_url, i) for i in ids}
    assert all(j["status"] in TERMINAL for j in jobs.values()), {i: j["status"] for i, j in jobs.items()}
    for i, j in jobs.items():  # each one ran to the end somewhere, or says why not
        assert j["status"] == "succeeded" or ("replica" in j["error"]["message"]), j
    for i in on_victim:
        events = _events(ray_url, i)
        assert "retrying" in events and events[-1] in TERMINAL, events
        assert jobs[i]["replica"] != victim or jobs[i]["status"] == "failed"
    assert sum(j["status"] == "succeeded" for j in jobs.values()) >= len(ids) - len(on_victim)

    deadline = time.monotonic() + 180  # Serve's controller starts a replacement
    health = {}
    while time.monotonic() < deadline:
        health = httpx.get(f"{ray_url}/healthz", timeout=30).json()
        if health["replicas"].get("RUNNING") == 2:
            break
        time.sleep(1)
    assert health["replicas"].get("RUNNING") == 2, health
    r = httpx.post(f"{ray_url}/v1/images/generations", json={"prompt": "after", "size": "32x32", **FAST}, timeout=120)
    assert r.status_code == 200, r.text
