"""The sequential layer loop: observe a layer's inputs, quantize it, propagate its quantized outputs.

Each layer is calibrated on the outputs of the already-quantized layers before it (as GPTQ
and llm-compressor's sequential pipeline do), so later layers adapt to earlier errors.
Only one layer's weights and statistics are live at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from lance_deploy.calibrate.record import Program
from lance_deploy.calibrate.replay import observe, run_layer
from lance_deploy.config import LLMConfig
from lance_deploy.model.mot import MoTLayer
from lance_deploy.model.tree import INPUT_GROUPS
from lance_deploy.quant.act_amax import install_amax, observe_w8a8_inputs
from lance_deploy.quant.algorithms.registry import CALIBRATED, HESSIAN
from lance_deploy.quant.algorithms.stats import LayerStats
from lance_deploy.quant.apply import LayerResult, LinearJob, install, quantize_layer
from lance_deploy.quant.dequant_once import weights_built_once


def _stats_factory(layer: MoTLayer, jobs: dict[str, LinearJob], stats: dict, reservoir: int):
    """LayerStats per (expert, group), with a Hessian only where GPTQ will read it."""

    def make(expert: str, group: str) -> LayerStats:
        paths = INPUT_GROUPS[group].paths(expert)
        in_features = layer.get_submodule(paths[0]).weight.shape[1]
        hessian = any(jobs[p].algorithm in HESSIAN for p in paths if p in jobs)
        return stats.setdefault((expert, group), LayerStats(
            in_features, cap=reservoir, hessian_dtype=torch.float32 if hessian else None))

    return make


def quantize_one_layer(
    layer: MoTLayer, jobs: dict[str, LinearJob], cfg: LLMConfig, programs: list[Program],
    hidden: list[list[torch.Tensor]], device: torch.device, reservoir: int = 512,
    amax: tuple[str, float] = ("max", 99.99),
) -> tuple[LayerResult, list[list[torch.Tensor]]]:
    """Calibrate and quantize `layer` in place; returns its packed Linears and quantized outputs.

    With programs, the propagation pass also records each W8A8 Linear's per-tensor input amax
    (`amax` = (method, percentile), ``quant/act_amax.py``) into the result and the QLinears."""
    stats: dict = {}
    if any(j.algorithm in CALIBRATED for j in jobs.values()):
        handles = observe(layer, _stats_factory(layer, jobs, stats, reservoir))
        try:
            run_layer(layer, cfg, programs, hidden, device, desc="observe")
        finally:
            for h in handles:
                h.remove()
    result = quantize_layer(layer, jobs, stats)
    install(layer, result)
    if not programs:
        return result, hidden
    observers, handles = observe_w8a8_inputs(layer)
    try:
        with weights_built_once(layer):  # same outputs, one weight build per Linear instead of one per call
            hidden = run_layer(layer, cfg, programs, hidden, device, desc="propagate")
    finally:
        for h in handles:
            h.remove()
    result.act_amax = {p: o.value(*amax) for p, o in observers.items()}
    install_amax(layer, result.act_amax)
    return result, hidden


def quantize_layers(
    cfg: LLMConfig,
    programs: list[Program],
    layer_at: Callable[[int], MoTLayer],
    jobs_for: Callable[[int], dict[str, LinearJob]],
    device: torch.device,
    *,
    reservoir: int = 512,
    amax: tuple[str, float] = ("max", 99.99),
) -> Iterator[tuple[int, LayerResult, list[list[torch.Tensor]]]]:
    """Yield (layer index, its packed Linears, the layer's quantized outputs) for every layer."""
    hidden = [[c.x for c in p.calls] for p in programs]
    for index in range(cfg.num_hidden_layers):
        result, hidden = quantize_one_layer(layer_at(index), jobs_for(index), cfg, programs, hidden, device,
                                            reservoir, amax)
        yield index, result, hidden
