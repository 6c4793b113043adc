"""Resumable work directories for long jobs (calibrate, quantize).

The exllamav3 pattern: ``args.json`` fixes what the job computes and ``progress.json`` lists the
finished steps. A job's fingerprint is a sha256 over the source checkpoint's fingerprint, the
resolved recipe, the calibration config and the lance-deploy version; resuming with any of them
changed is refused with the differing fields named (silent drift would splice two different
quantizations into one artifact). Other arguments (device, progress bars, output path) may
change between runs and are simply rewritten.

Each step's outputs are saved under ``steps/`` as safetensors (deterministic bytes) with their
sha256 in ``progress.json``, so a resumed run reuses them bit for bit and a resumed artifact is
byte-identical to an uninterrupted one. Every file is replaced atomically. One process at a
time: ``start`` takes the lock ``<work>.lock`` (``core/lock.py``) unless the caller holds it.

Layout::

    <work>/args.json  <work>/progress.json  <work>/steps/<step>.safetensors
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lance_deploy import __version__
from lance_deploy.checkpoint.fingerprint import SourceFingerprint, source_fingerprint
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.checkpoint.safetensors_write import SafetensorsWriter
from lance_deploy.core.errors import CheckpointError, LanceUsageError
from lance_deploy.core.faults import fault_point
from lance_deploy.core.fsutil import atomic_path, sha256_file
from lance_deploy.core.lock import PathLock, held_here

__all__ = ["JobFingerprint", "JobState", "SourceFingerprint", "source_fingerprint"]

ARGS, PROGRESS, STEPS = "args.json", "progress.json", "steps"
_STEP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class JobFingerprint:
    """What a job computes: ``parts`` (source, recipe, calibration, version, ...) and their digest."""

    parts: Mapping[str, Any]

    @classmethod
    def of(cls, source: Mapping[str, Any], recipe: Mapping[str, Any], calibration: Mapping[str, Any] | None,
           version: str = __version__, **extra: Any) -> JobFingerprint:
        """Fingerprint from plain-data parts (``SourceFingerprint.to_dict()``, ``Recipe.to_dict()``, ...)."""
        return cls({"source": dict(source), "recipe": dict(recipe), "calibration": calibration,
                    "version": version, **extra})

    @property
    def digest(self) -> str:
        return _digest(self.parts)


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{path}.{k}" if path else str(k), out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            _diff(a, b, f"{path}[{i}]", out)
    elif old != new:
        show = lambda v: json.dumps(v)[:60]
        out.append(f"{path} ({show(old)} -> {show(new)})")


@dataclass
class JobState:
    """A work directory: ``start`` it, then ``save_step``/``load_step``, ``done``/``is_done``."""

    work_dir: Path
    created: str = ""
    run_id: str = ""  # fixed when the job is created: names the partial artifact it may resume
    _progress: dict[str, Any] = field(default_factory=dict)
    _lock: PathLock | None = None

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)

    def start(self, fingerprint: JobFingerprint, args: Mapping[str, Any] | None = None,
              restart: bool = False) -> bool:
        """Create or resume the work dir; returns True when resuming finished steps.

        Raises LanceUsageError naming the differing fields when the work dir belongs to a job
        with another fingerprint, unless ``restart`` (which discards its progress and steps), and
        LockedError when another process has the work dir."""
        if self._lock is None and not held_here(self.work_dir):
            self._lock = PathLock(self.work_dir, "--work").acquire()
        try:
            return self._open(fingerprint, args, restart)
        except BaseException:
            self.close()
            raise

    def _open(self, fingerprint: JobFingerprint, args: Mapping[str, Any] | None, restart: bool) -> bool:
        args_path = self.work_dir / ARGS
        if restart:
            self._clear()
        elif args_path.exists():
            saved = self._read_json(args_path)
            if saved.get("fingerprint") != fingerprint.digest:
                diffs: list[str] = []
                _diff(saved.get("parts", {}), json.loads(json.dumps(fingerprint.parts)), "", diffs)
                shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
                raise LanceUsageError(
                    f"{self.work_dir}: this work dir belongs to a job with different settings: "
                    f"{shown or 'fingerprint differs'}. Resuming would mix two quantizations; pass --restart to "
                    "discard its progress, or use another --work")
            self.created = saved["created"]
            self.run_id = saved.get("run_id") or uuid.uuid4().hex
            progress = self.work_dir / PROGRESS
            self._progress = self._read_json(progress) if progress.exists() else self._empty(fingerprint)
            if self._progress.get("fingerprint") != fingerprint.digest:
                raise LanceUsageError(f"{progress}: belongs to another job than {ARGS}; pass --restart")
            self._write_args(fingerprint, args)
            for stale in (self.work_dir / STEPS).glob(".*.tmp-*"):  # a killed run's half-written step
                stale.unlink()
            return bool(self._progress.get("done"))
        self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.run_id = uuid.uuid4().hex
        self._progress = self._empty(fingerprint)
        self._write_args(fingerprint, args)
        self._write_progress()
        return False

    def close(self) -> None:
        """Release the work dir's lock if ``start`` took it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> JobState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _empty(fp: JobFingerprint) -> dict[str, Any]:
        return {"fingerprint": fp.digest, "done": [], "outputs": {}}

    def _write_args(self, fp: JobFingerprint, args: Mapping[str, Any] | None) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        data = {"fingerprint": fp.digest, "created": self.created, "run_id": self.run_id, "parts": fp.parts,
                "args": dict(args or {})}
        with atomic_path(self.work_dir / ARGS) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")

    def _write_progress(self) -> None:
        with atomic_path(self.work_dir / PROGRESS) as tmp:
            tmp.write_text(json.dumps(self._progress, indent=1) + "\n")

    def _read_json(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LanceUsageError(f"{path}: unreadable job state ({e}); pass --restart to start over") from None
        if not isinstance(data, dict):
            raise LanceUsageError(f"{path}: unreadable job state (not a JSON object); pass --restart to start over")
        return data

    def _clear(self) -> None:
        """Remove only what this class writes; other files in the work dir are left alone."""
        for name in (ARGS, PROGRESS):
            (self.work_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.work_dir / STEPS, ignore_errors=True)

    def _check_started(self) -> None:
        if not self._progress:
            raise LanceUsageError(f"{self.work_dir}: job not started (call start() first)")

    def is_done(self, step: str) -> bool:
        self._check_started()
        return step in self._progress["done"]

    def completed(self) -> list[str]:
        """Finished steps in completion order."""
        self._check_started()
        return list(self._progress["done"])

    def done(self, step: str, output_sha256: str | None = None) -> None:
        """Mark ``step`` finished (persisted atomically before returning)."""
        self._check_started()
        _check_step(step)
        if step not in self._progress["done"]:
            self._progress["done"].append(step)
        if output_sha256 is not None:
            self._progress["outputs"][step] = output_sha256
        self._write_progress()

    def forget(self, steps) -> None:
        """Mark `steps` unfinished again (their outputs were lost elsewhere, e.g. with a partial artifact)."""
        self._check_started()
        gone = [s for s in steps if s in self._progress["done"]]
        if gone:
            self._progress["done"] = [s for s in self._progress["done"] if s not in gone]
            for s in gone:
                self._progress["outputs"].pop(s, None)
            self._write_progress()

    def step_path(self, step: str) -> Path:
        return self.work_dir / STEPS / f"{_check_step(step)}.safetensors"

    def save_step(self, step: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> None:
        """Write a step's outputs atomically, then mark it done with their sha256."""
        path = self.step_path(step)
        entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
        with SafetensorsWriter(path, entries, metadata=dict(meta or {})) as w:
            for k, t in tensors.items():
                w.write(k, t)
        fault_point("job.step-written")  # killed here: not in progress.json, so recomputed
        self.done(step, w.sha256 or sha256_file(path))  # hashed while written: no read-back

    def load_step(self, step: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A finished step's tensors and metadata, checked against the recorded sha256."""
        if not self.is_done(step):
            raise LanceUsageError(f"{self.work_dir}: step {step!r} is not finished")
        path = self.step_path(step)
        want = self._progress["outputs"].get(step)
        if not path.is_file() or (want is not None and sha256_file(path) != want):
            raise LanceUsageError(f"{path}: saved output of step {step!r} is missing or corrupt; pass --restart")
        try:
            with SafetensorsReader(path) as r:
                return {k: r.read(k) for k in r.keys()}, dict(r.metadata)
        except CheckpointError as e:
            raise LanceUsageError(f"{e}; pass --restart") from None


def _check_step(step: str) -> str:
    if not isinstance(step, str) or not _STEP.fullmatch(step):
        raise LanceUsageError(f"step name {step!r} must be letters, digits, '_', '.', '-' (no path separators)")
    return step
