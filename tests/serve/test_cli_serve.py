"""`lance-deploy serve` as a user starts it: a subprocess on 127.0.0.1, a bearer key, a real request,
then Ctrl-C stops it cleanly. Option mistakes fail before anything loads."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest
from click.testing import CliRunner
from serve_util import FAST, free_socket

from lance_deploy.cli import cli


def test_serve_subprocess_with_api_key(ckpt, tmp_path):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "lance_deploy", "serve", "--model", str(ckpt), "--port", str(port), "--api-key",
           "k3y", "--no-ui", "--device", "cpu", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        r = httpx.post(f"{url}/v1/images/generations", headers={"Authorization": "Bearer k3y"}, timeout=120,
                       json={"prompt": "boat", "size": "32x32", **FAST})
        assert r.status_code == 200, r.text
        assert len(list((tmp_path / "out" / "results").glob("*.png"))) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-2000:]
    assert f"serving lance-3b-video on {url}" in out


@pytest.mark.parametrize("args, words", [
    (["--replicas", "2"], "need --ray"),
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--ray", "--replicas", "3", "--max-replicas", "2"], "outside --min-replicas"),
])
def test_option_mistakes_are_usage_errors(tmp_path, args, words):
    res = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and words in res.output, res.output
