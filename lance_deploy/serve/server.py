"""`lance-deploy serve`: load the model once, start the worker, serve the API (and the UI) with uvicorn."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from lance_deploy.core.optional import require


@dataclass(frozen=True)
class ServeConfig:
    model: Path
    out: Path = Path("lance-serve")
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    queue_size: int = 8
    queue_timeout_s: float = 600.0
    max_upload_bytes: int = 64 << 20
    gpu_memory: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    variant: str | None = None  # 'image' | 'video' for a download folder
    ui: bool = True


def build_app(config: ServeConfig, engine=None):
    """The app with its scheduler started; the worker stops when the app shuts down."""
    from lance_deploy.serve.app import AppConfig, create_app
    from lance_deploy.serve.engine import Engine
    from lance_deploy.serve.scheduler import LocalScheduler

    for module in ("fastapi", "uvicorn", "sse_starlette", "python_multipart"):
        require(module)
    engine = engine or Engine.load(config.model, variant=config.variant, gpu_memory=config.gpu_memory,
                                   device=config.device, dtype=config.dtype)
    scheduler = LocalScheduler(engine, config.out, queue_size=config.queue_size,
                               queue_timeout_s=config.queue_timeout_s).start()
    app = create_app(scheduler, AppConfig(api_key=config.api_key, max_upload_bytes=config.max_upload_bytes))
    if config.ui:
        from lance_deploy.serve.ui import mount_ui

        app = mount_ui(app, scheduler, config.out, api_key=config.api_key, max_upload_bytes=config.max_upload_bytes)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            yield state
        scheduler.stop()

    app.router.lifespan_context = lifespan
    return app


def serve(config: ServeConfig, log=print) -> None:
    uvicorn = require("uvicorn")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = build_app(config)
    where = f"http://{config.host}:{config.port}"
    log(f"serving {app.state.scheduler.model_id} on {where}" + (f" (web UI at {where}/ui)" if config.ui else ""))
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=30)
