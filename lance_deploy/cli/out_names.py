"""Where `run` writes: `--out FILE`, `--out FOLDER/`, or a default name in the current folder.

Default names follow `NAME_TEMPLATE`, e.g. ``lance-t2i-s42-20260714-093012.png``; when that name
is taken (or gets taken while the run works) ``-2``, ``-3``, ... is added. A default name never
replaces a file: the output is linked into place only if the name is still free
(`core.fsutil.publish(overwrite=False)`). An explicit `--out FILE` is replaced atomically, as asked.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.tasks import UNDERSTANDING_TASKS, output_extension

NAME_TEMPLATE = "lance-{task}-s{seed}-{time}{n}.{ext}"
"""`time` is local time as YYYYmmdd-HHMMSS; `n` is "" or "-2", "-3", ... for the next free name."""
MAX_TRIES = 10_000


@dataclass
class OutTarget:
    """The output path; for a default name also what it was made from (it is then never overwritten)."""

    path: Path | None  # None: x2t without --out prints the answer only
    unique: bool = False
    task: str = ""
    seed: int = 0
    stamp: str = ""

    def next_free(self) -> Path:
        """The next free default name (the current one was taken while the run worked)."""
        self.path = free_name(self.path.parent, self.task, self.seed, self.path.suffix.lstrip("."), self.stamp)
        return self.path


def free_name(folder: Path, task: str, seed: int, ext: str, stamp: str) -> Path:
    """The first `NAME_TEMPLATE` name in `folder` that no file has."""
    for i in range(1, MAX_TRIES + 1):
        p = folder / NAME_TEMPLATE.format(task=task, seed=seed, time=stamp, n="" if i == 1 else f"-{i}", ext=ext)
        if not p.exists() and not p.with_suffix(".json").exists():  # an MP4's sidecar shares the stem
            return p
    raise LanceUsageError(f"--out {folder}: {MAX_TRIES:,} outputs named like {p.name} already; use another folder")


def resolve_out(task: str, out: str | Path | None, seed: int, frames: int | None,
                now: float | None = None) -> OutTarget:
    """`--out` as given (the raw text: a trailing / says folder): a folder gets a default name."""
    if out is None and task in UNDERSTANDING_TASKS:
        return OutTarget(None)
    folder = None
    if out is None:
        folder = Path(".")
    elif Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        folder = Path(out)
    if folder is None:
        return OutTarget(Path(out))
    if not folder.is_dir():
        raise LanceUsageError(f"--out {out}: the folder does not exist; create it first")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return OutTarget(free_name(folder, task, seed, output_extension(task, frames), stamp), True, task, seed, stamp)
