"""The ``calibration`` section of a recipe: which prompts, timesteps and CFG branches feed the
statistics. It is part of a quantize job's fingerprint, so everything that changes the
statistics lives here (including the reference-run sizes), and nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lance_deploy.core.schema import check_keys, expect, fail, one_of
from lance_deploy.core.tasks import TASKS

CALIBRATION_TASKS = TASKS
CFG_BRANCHES = ("cond", "uncond")
AMAX_METHODS = ("max", "percentile")


@dataclass(frozen=True)
class Stratified:
    """``{stratified: N}``: N denoising steps evenly spaced over the whole schedule."""

    count: int


Timesteps = str | tuple[int, ...] | Stratified
"""'all', an explicit tuple of step indices, or Stratified(N)."""


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration inputs. Generation tasks are observed at the selected steps of a ``steps``-step
    loop in every listed CFG branch; understanding tasks on their prompts and model-made media.

    tasks:            subset of CALIBRATION_TASKS (prompt sets in ``prompts_dir``).
    samples_per_task: prompts per task, chosen deterministically with ``seed``.
    steps:            denoising steps of each reference run.
    timesteps:        'all' | [step indices] | {stratified: N}.
    cfg_branches:     non-empty subset of ('cond', 'uncond').
    height/width/frames: size of the reference generations (frames for video tasks).
    activation_amax:  how a W8A8 Linear's static per-tensor activation amax is taken from the
                      recorded inputs: 'max' or 'percentile' (of |x|, ``amax_percentile``), as
                      ModelOpt's max / histogram-percentile calibrators (``quant/act_amax.py``).
    """

    tasks: tuple[str, ...] = ("t2i",)
    samples_per_task: int = 16
    steps: int = 30
    timesteps: Timesteps = "all"
    cfg_branches: tuple[str, ...] = CFG_BRANCHES
    prompts_dir: str = "calibration"
    seed: int = 0
    height: int = 256
    width: int = 256
    frames: int = 9
    activation_amax: str = "max"
    amax_percentile: float = 99.99

    @property
    def amax_choice(self) -> tuple[str, float]:
        return self.activation_amax, float(self.amax_percentile)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "cfg_branches", tuple(self.cfg_branches))
        if isinstance(self.timesteps, list):
            object.__setattr__(self, "timesteps", tuple(self.timesteps))

    def validate(self, where: str = "calibration") -> None:
        """Field checks with the allowed values in every message."""
        if not self.tasks:
            raise fail(f"{where}.tasks", f"at least one task; allowed: {', '.join(CALIBRATION_TASKS)}")
        for t in self.tasks:
            one_of(t, CALIBRATION_TASKS, f"{where}.tasks")
        if len(set(self.tasks)) != len(self.tasks):
            raise fail(f"{where}.tasks", f"duplicate task in {list(self.tasks)}")
        for k in ("samples_per_task", "steps", "seed", "height", "width", "frames"):
            v = expect(getattr(self, k), (int,), f"{where}.{k}", "an integer")
            if v < (0 if k == "seed" else 1):
                raise fail(f"{where}.{k}", f"must be {'>= 0' if k == 'seed' else '>= 1'}, got {v}")
        if not self.cfg_branches:
            raise fail(f"{where}.cfg_branches", f"at least one of {', '.join(CFG_BRANCHES)}")
        for b in self.cfg_branches:
            one_of(b, CFG_BRANCHES, f"{where}.cfg_branches")
        expect(self.prompts_dir, (str,), f"{where}.prompts_dir", "a folder path")
        one_of(self.activation_amax, AMAX_METHODS, f"{where}.activation_amax")
        p = expect(self.amax_percentile, (int, float), f"{where}.amax_percentile", "a number")
        if not 50 < p <= 100:
            raise fail(f"{where}.amax_percentile", f"must be in (50, 100], got {p}")
        self._validate_timesteps(f"{where}.timesteps")

    def _validate_timesteps(self, where: str) -> None:
        ts = self.timesteps
        if isinstance(ts, Stratified):
            n = expect(ts.count, (int,), f"{where}.stratified", "an integer")
            if not 1 <= n <= self.steps:
                raise fail(f"{where}.stratified", f"must be between 1 and steps ({self.steps}), got {n}")
        elif isinstance(ts, tuple):
            if not ts:
                raise fail(where, "an empty list selects no step; use 'all' or {stratified: N}")
            for s in ts:
                expect(s, (int,), where, "step indices (integers)")
                if not 0 <= s < self.steps:
                    raise fail(where, f"step {s} outside 0..{self.steps - 1}")
            if len(set(ts)) != len(ts):
                raise fail(where, f"duplicate step in {list(ts)}")
        elif ts != "all":
            raise fail(where, f"{ts!r} not allowed; allowed: 'all', a list of step indices, {{stratified: N}}")

    def step_indices(self) -> tuple[int, ...]:
        """The selected denoising-step indices, ascending (stratified as ``record.stratified_steps``)."""
        ts = self.timesteps
        if ts == "all":
            return tuple(range(self.steps))
        if isinstance(ts, Stratified):
            if ts.count >= self.steps:
                return tuple(range(self.steps))
            # torch.linspace, not Python floats: it must pick exactly the steps the recorder keeps.
            picks = torch.linspace(0, self.steps - 1, ts.count).tolist()
            return tuple(sorted({round(i) for i in picks}))
        return tuple(sorted(ts))

    def to_dict(self) -> dict[str, Any]:
        ts = self.timesteps
        ts_out: Any = list(ts) if isinstance(ts, tuple) else ts
        if isinstance(ts, Stratified):
            ts_out = {"stratified": ts.count}
        return {"tasks": list(self.tasks), "samples_per_task": self.samples_per_task, "steps": self.steps,
                "timesteps": ts_out, "cfg_branches": list(self.cfg_branches), "prompts_dir": self.prompts_dir,
                "seed": self.seed, "height": self.height, "width": self.width, "frames": self.frames,
                "activation_amax": self.activation_amax, "amax_percentile": self.amax_percentile}

    @classmethod
    def from_dict(cls, d: Any, where: str = "calibration") -> CalibrationConfig:
        d = check_keys(cls, d, where)
        for k in ("tasks", "cfg_branches"):
            if k in d:
                d[k] = tuple(expect(d[k], (list, tuple), f"{where}.{k}", "a list"))
        ts = d.get("timesteps", "all")
        if isinstance(ts, dict):
            if set(ts) != {"stratified"}:
                raise fail(f"{where}.timesteps", f"unknown keys {sorted(ts)}; allowed: {{stratified: N}}")
            ts = Stratified(ts["stratified"])
        elif isinstance(ts, list):
            ts = tuple(ts)
        d["timesteps"] = ts
        return cls(**d)
