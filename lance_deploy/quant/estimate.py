"""Before a calibrated quantize runs long: what it will record and about how long it will take.

The probe is work the run needs anyway plus one layer's worth of rehearsal: the first
calibration run of every task (timed as it records; its program is kept), then decoder layer 0
replayed over those programs once at full precision and once through `quantize_one_layer`
(observe, search, quantized replay) on a throw-away copy. The estimate scales that:

- calibration: each task's first run × its remaining runs;
- per layer: two replays, which grow with the programs (probe replay × runs per task), plus the
  searches (AWQ grid, GPTQ columns), which do not (their statistics are a fixed-size reservoir
  and one Hessian); every decoder layer has the same shapes, so layer 0 stands for all of them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from lance_deploy.calibrate.collect import Probe
from lance_deploy.calibrate.replay import run_layer
from lance_deploy.checkpoint.loader import load_layer
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.core import progress as prog
from lance_deploy.quant.apply import LinearJob
from lance_deploy.quant.layerwise import quantize_one_layer


@dataclass(frozen=True)
class Estimate:
    """Counts and seconds of a calibrated quantize, as `probe` predicts them."""

    programs: int  # calibration programs to record (tasks × samples)
    tasks: int
    calls: int  # backbone calls they will hold (from the probe's programs)
    layers: int  # decoder layers to calibrate and quantize
    linears: int  # Linears quantized in each layer
    probe_s: float  # what the probe took
    calibration_s: float  # the calibration runs still to go
    layer_s: float  # one layer: two replays and its searches (0 when only calibrating)
    search_s: float  # of which the searches

    @property
    def total_s(self) -> float:
        return self.calibration_s + self.layers * self.layer_s

    def line(self) -> str:
        head = (f"estimate: {self.programs} calibration programs ({self.tasks} tasks × {self.programs // self.tasks}), "
                f"~{self.calls:,} recorded calls")
        if not self.layers:
            return f"{head}; calibration ~{_mins(self.calibration_s)} more (probe {self.probe_s:.0f} s)"
        return (f"{head}; {self.layers} decoder layers × {self.linears} Linears; calibration ~{_mins(self.calibration_s)}"
                f" more, layers ~{_mins(self.layers * self.layer_s)} ({self.layer_s:.1f} s each, searches "
                f"{self.search_s:.1f} s); about {_mins(self.total_s)} in all (probe {self.probe_s:.0f} s)")

    def to_dict(self) -> dict:
        return asdict(self) | {"total_s": round(self.total_s, 1)}


def _mins(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def estimate(probe: Probe, samples_per_task: int, *, layout=None, jobs: dict[str, LinearJob] | None = None,
             device="cpu") -> Estimate:
    """Scale `probe` to the whole run; with `layout` and layer 0's `jobs`, rehearse layer 0 too."""
    start, device = time.perf_counter(), torch.device(device)
    remaining = samples_per_task - 1
    calls = sum(len(p.calls) for p in probe.programs) * samples_per_task
    layers = linears = 0
    layer_s = search_s = 0.0
    if layout is not None and jobs is not None:
        cfg = layout.config()
        with SafetensorsReader(layout.weights_file) as reader:
            layer = load_layer(reader, cfg, 0, device=device)
        hidden = [[c.x for c in p.calls] for p in probe.programs]
        replay = _timed(run_layer, layer, cfg, probe.programs, hidden, device)
        whole = _timed(quantize_one_layer, layer, jobs, cfg, probe.programs, hidden, device)
        search_s = max(whole - 2 * replay, 0.0)
        layer_s = 2 * replay * samples_per_task + search_s
        layers, linears = cfg.num_hidden_layers, len(jobs)
    probe_s = sum(probe.seconds.values()) + time.perf_counter() - start
    return Estimate(samples_per_task * len(probe.programs), len(probe.programs), calls, layers, linears, probe_s,
                    sum(probe.seconds.values()) * remaining, layer_s, search_s)


def announce(est: Estimate, enabled: bool | None = True) -> None:
    """The estimate on stderr (an `estimate` event under --json; nothing under --quiet)."""
    prog.note(est.line(), event="estimate", enabled=enabled, **est.to_dict())
