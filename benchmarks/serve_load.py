"""Bounded load test of `lance-deploy serve` on loopback: N requests at concurrency C, nothing lost.

    python benchmarks/serve_load.py --model exported/tiny --requests 200 --concurrency 32
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 200 --concurrency 32

Every request must end in a success, a 429 (queue full, with Retry-After) or a clean JSON error;
a transport error or a response without an error body counts as lost. /healthz must be fine after.
Prints one JSON object with the figures; exit 1 if anything was lost. Only 127.0.0.1 is targeted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from collections import Counter
from urllib.parse import urlparse


def _png() -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64 * 3) % 251).astype("uint8").reshape(64, 64, 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _requests(n: int) -> list[tuple[str, str, dict]]:
    """A fixed mix: 7 in 10 t2i, 2 x2t questions, 1 bad request (a size not /16)."""
    image = _png()
    chat = {"max_tokens": 4, "vit_area_side": 64, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": image}}]}]}
    out = []
    for i in range(n):
        k = i % 10
        if k < 7:
            out.append(("t2i", "/v1/images/generations",
                        {"prompt": f"boat {i}", "size": "64x64", "steps": 2, "seed": i, "response_format": "url"}))
        elif k < 9:
            out.append(("x2t", "/v1/chat/completions", chat))
        else:
            out.append(("bad", "/v1/images/generations", {"prompt": "x", "size": "70x64"}))
    return out


async def run(url: str, n: int, concurrency: int, timeout: float, retries: int = 0) -> dict:
    import httpx

    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load-test {host}: loopback only")
    sem = asyncio.Semaphore(concurrency)
    outcomes: Counter = Counter()
    latency: list[float] = []
    lost: list[str] = []

    async def one(c, kind, path, body):
        async with sem:
            t = time.perf_counter()
            for attempt in range(retries + 1):  # a polite client waits Retry-After seconds, a bounded number of times
                try:
                    r = await c.post(path, json=body)
                except httpx.HTTPError as e:
                    lost.append(f"{kind}: {type(e).__name__}: {e}")
                    return
                if r.status_code != 429 or attempt == retries:
                    break
                outcomes["429 retried"] += 1
                await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 10.0))
            dt = time.perf_counter() - t
            if r.status_code == 200:
                outcomes[f"{kind} 200"] += 1
                latency.append(dt)
                return
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                lost.append(f"{kind}: {r.status_code} without an error body")
                return
            if r.status_code == 429 and not r.headers.get("retry-after"):
                lost.append(f"{kind}: 429 without Retry-After")
            elif "\n" in message:
                lost.append(f"{kind}: {r.status_code} with a multi-line message")
            else:
                outcomes[f"{kind} {r.status_code}"] += 1

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        await asyncio.wait_for(asyncio.gather(*[one(c, *req) for req in _requests(n)]), timeout=timeout * 4)
        wall = time.perf_counter() - start
        health = (await c.get("/healthz")).json()
    ok = sum(v for k, v in outcomes.items() if k.endswith(" 200"))
    return {
        "requests": n, "concurrency": concurrency, "retries": retries, "wall_s": round(wall, 2),
        "outcomes": dict(sorted(outcomes.items())),
        "lost": lost, "successes_per_s": round(ok / wall, 2),
        "latency_s": {"p50": round(statistics.median(latency), 3) if latency else None,
                      "p95": round(statistics.quantiles(latency, n=20)[-1], 3) if len(latency) >= 20 else None,
                      "max": round(max(latency), 3) if latency else None},
        "health_after": {k: health.get(k) for k in ("status", "worker_alive", "queue", "completed")},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on loopback")
    where.add_argument("--model", help="start a server on this checkpoint in-process (CPU)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--queue-size", type=int, default=16, help="with --model: the server's queue")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--retries", type=int, default=0, help="times a client retries a 429 after Retry-After")
    a = ap.parse_args(argv)
    if a.url:
        report = asyncio.run(run(a.url, a.requests, a.concurrency, a.timeout, a.retries))
    else:
        report = _with_server(a)
    print(json.dumps(report, indent=1))
    healthy = report["health_after"]["status"] == "ok" and report["health_after"]["worker_alive"]
    return 0 if not report["lost"] and healthy else 1


def _with_server(a) -> dict:
    import socket
    import tempfile
    import threading
    from pathlib import Path

    import uvicorn

    from lance_deploy.serve.server import ServeConfig, build_app

    with tempfile.TemporaryDirectory(prefix="lance-load-") as out:
        app = build_app(ServeConfig(model=Path(a.model), out=Path(out), device="cpu", ui=False,
                                    queue_size=a.queue_size))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            return asyncio.run(run(url, a.requests, a.concurrency, a.timeout, a.retries))
        finally:
            server.should_exit = True
            thread.join(30)


if __name__ == "__main__":
    sys.exit(main())
