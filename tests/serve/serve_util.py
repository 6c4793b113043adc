"""Helpers for the server tests: live uvicorn servers on 127.0.0.1 (a free port each) and small media."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(os.environ.get("LANCE_GOLDEN", ROOT.parent / "shared" / "golden"))
ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots (git-ignored)

# small and quick on the tiny model: every request below takes well under a second of compute
FAST = {"steps": 2}
SIDE = {"vae_area_side": 64, "vit_area_side": 64}


@dataclass
class Live:
    url: str
    app: object
    out: Path

    @property
    def scheduler(self):
        return self.app.state.scheduler


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def live_app(app, *, start_timeout: float = 60.0):
    """Serve `app` with uvicorn in a thread on 127.0.0.1:<free port>; yields the base URL."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@contextmanager
def live_server(engine, ckpt, out: Path, **options):
    """A whole `lance-deploy serve` app (scheduler, API, optionally the UI) on the shared engine."""
    from lance_deploy.serve.server import ServeConfig, build_app

    config = ServeConfig(model=ckpt, out=out, device="cpu", ui=options.pop("ui", False), **options)
    app = build_app(config, engine=engine)
    with live_app(app) as url:
        yield Live(url, app, out)


# --------------------------------------------------------------------------- media


def gradient(h: int = 64, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1).astype(np.uint8)


def png_bytes(frame: np.ndarray | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gradient() if frame is None else frame).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(tmp_path: Path, frames: int = 9) -> bytes:
    from lance_deploy.media.io import write_video

    clip = np.stack([np.roll(gradient(), 4 * i, axis=1) for i in range(frames)])
    path = tmp_path / "clip.mp4"
    write_video(clip, path, fps=12)
    return path.read_bytes()


def data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat_body(url: str, kind: str = "image_url", question: str = "What is shown?", **extra) -> dict:
    part = {"type": kind, kind: {"url": url}}
    return {"model": "lance", "max_tokens": 6, "vit_area_side": 64,
            "messages": [{"role": "user", "content": [{"type": "text", "text": question}, part]}], **extra}
