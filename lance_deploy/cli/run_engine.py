"""What `run`, `run --continue` and batches share: the `--backend` object and the out-of-memory message."""

from __future__ import annotations

import click

from lance_deploy.core.errors import LanceError
from lance_deploy.core.tasks import VIDEO_TASKS


def oom_error(phase: str, gpu_memory, err) -> LanceError:
    """One line naming the phase and a way out (a budget to plan with, or a lighter recipe)."""
    import re

    first = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
    m = re.search(r"([\d.]+ [GM]iB) is free", first)
    free = f" ({m.group(1)} was free)" if m else ""
    hint = ("a lower --gpu-memory than " + gpu_memory if gpu_memory
            else "--gpu-memory SIZE (e.g. what `lance-deploy memory-plan` says fits)")
    return LanceError(f"out of GPU memory during {phase}{free}: try {hint}, a quantized artifact (`lance-deploy "
                      "quantize MODEL --recipe int8-rtn --out DIR`, then --model DIR), fewer frames or a smaller size")


def make_engine(task, name, graphs, model_path, vit, vae, quiet):
    """The `--backend` object (None for torch), built before any weights load so its errors come first."""
    if name == "torch" and graphs is None:
        return None
    from lance_deploy.export.backend import make_backend

    check_backend(task, name)
    variant = "video" if task in VIDEO_TASKS else "image"
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    return make_backend(name, model_path, graphs, vit=vit, vae=vae, variant=variant, log=log)


def check_backend(task: str, name: str) -> None:
    from lance_deploy.core.errors import LanceUsageError

    if task.startswith("x2t") and name != "torch":
        raise LanceUsageError(f"--backend {name} covers the generation tasks; run {task} with --backend torch")
