"""The Python front end: a pipeline from a path and the same choices as `lance-deploy run`.

    from lance_deploy.api import load_pipeline
    pipe = load_pipeline("~/Lance", task="t2i", gpu_memory="12GiB")

It sits beside `cli/` at the top of the package: it plans (`planning`), builds the graph
backend (`export.backend`) and hands both to `pipeline.LancePipeline`, which knows neither.
"""

from __future__ import annotations

from pathlib import Path

from lance_deploy.api_session import EditSession  # noqa: F401  (re-exported: multi-turn editing)
from lance_deploy.core.tasks import VIDEO_TASKS


def load_pipeline(path, task: str | tuple[str, ...], *, gpu_memory=None, backend: str | None = None,
                  graphs=None, markers: str = "auto", vit=None, vae=None, device=None, dtype=None, request=None):
    """`LancePipeline.from_path` with a budget and a backend given by name.

    `gpu_memory` ('12GiB' or bytes) plans residency for `request` (a `TaskRequest`; the task's
    defaults when None); `backend` is "torch", "onnxruntime" or "tensorrt"."""
    from lance_deploy.pipeline.pipeline import LancePipeline, resolve_device, resolve_dtype
    from lance_deploy.pipeline.tasks import TaskRequest

    path = Path(path).expanduser()
    tasks = (task,) if isinstance(task, str) else tuple(task)
    engine = None
    if backend not in (None, "torch") or graphs is not None:
        from lance_deploy.export.backend import make_backend

        variant = "video" if any(t in VIDEO_TASKS for t in tasks) else "image"
        engine = make_backend(backend or "torch", path, graphs, vit=vit, vae=vae, variant=variant)
    plan = None
    if gpu_memory is not None:
        from lance_deploy.planning.request import plan_residency

        dev = resolve_device(device)
        plan = plan_residency(path, request or TaskRequest(task=tasks[0]), gpu_memory, resolve_dtype(dtype, dev),
                              vit=vit, vae=vae, markers=markers)
    return LancePipeline.from_path(path, tasks, vit=vit, vae=vae, device=device, dtype=dtype, backend=engine,
                                   memory_plan=plan)
