"""Crash-test hook: stop a run at a named point, to prove that every kill point resumes.

``LANCE_DEPLOY_FAULT=kill@<point>[#n]`` SIGKILLs the process the n-th time (default: first) it
reaches ``fault_point("<point>")``; ``wait@<point>[#n]`` blocks there until the file named by
``LANCE_DEPLOY_FAULT_GO`` exists, then goes on. The quantizer and the artifact writer call it
between the steps that must survive a kill (layer saved, shard closed, manifest written, the
seal renames); tests/quant/test_kill_resume.py drives it. Unset, a call is one environ lookup.
"""

from __future__ import annotations

import os
import signal
import time

from lance_deploy.core.errors import LanceUsageError

ENV, GO_ENV = "LANCE_DEPLOY_FAULT", "LANCE_DEPLOY_FAULT_GO"
ACTIONS = ("kill", "wait")
WAIT_LIMIT_S = 600  # a forgotten go file must not hang a run for ever

_reached: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, str, int]:
    action, _, target = spec.partition("@")
    point, _, nth = target.partition("#")
    if action not in ACTIONS or not point or not (nth or "1").isdigit():
        raise LanceUsageError(f"{ENV}={spec!r}: expected kill@POINT or wait@POINT, optionally #N (the N-th time)")
    return action, point, int(nth or 1)


def fault_point(name: str) -> None:
    """Kill or pause here when ``LANCE_DEPLOY_FAULT`` names this point (see the module doc)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, point, nth = _parse(spec)
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    go, deadline = os.environ.get(GO_ENV), time.monotonic() + WAIT_LIMIT_S
    if not go:
        raise LanceUsageError(f"{ENV}={spec!r} needs {GO_ENV}: the file whose appearance ends the wait")
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
