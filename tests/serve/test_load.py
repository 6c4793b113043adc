"""A bounded load test (benchmarks/serve_load.py, smaller): concurrent clients over a small queue on
loopback; every request ends in a success, a 429 with Retry-After or a clean error; health after."""

from __future__ import annotations

import asyncio
import importlib.util

from serve_util import ROOT, live_server


def _bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_nothing_is_lost_under_load(engine, ckpt, tmp_path):
    bench = _bench()
    with live_server(engine, ckpt, tmp_path, queue_size=4) as live:
        report = asyncio.run(bench.run(live.url, 60, 16, timeout=120))
    assert report["lost"] == [], report
    out = report["outcomes"]
    assert sum(out.values()) == 60
    assert out.get("bad 400") == 6 and out.get("t2i 200", 0) >= 1 and out.get("t2i 429", 0) >= 1, out
    assert report["health_after"]["status"] == "ok" and report["health_after"]["worker_alive"]
