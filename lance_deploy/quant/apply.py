"""Quantize the Linears of one decoder layer from its calibration statistics.

Linears that read the same input (q/k/v after `input_layernorm`, gate/up after
`post_attention_layernorm`) and share an AWQ or SmoothQuant spec get one input scale
s, folded into that RMSNorm's weight (free at run time). Anything else that uses a
scale keeps it as the QLinear's runtime divisor (`smooth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lance_deploy.calibrate.replay import INPUT_GROUPS, gen_name
from lance_deploy.formats import FormatSpec, PackedTensor
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.model.mot import MoTLayer
from lance_deploy.quant.algorithms import awq, gptq, rtn, smoothquant
from lance_deploy.quant.algorithms.awq import awq_group
from lance_deploy.quant.algorithms.scaling import fold_into_norm
from lance_deploy.quant.algorithms.smoothquant import smoothquant_group
from lance_deploy.quant.algorithms.stats import LayerStats

NORM_OF_GROUP = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}
CALIBRATED = ("awq", "gptq", "smoothquant")


@dataclass(frozen=True)
class LinearJob:
    """How one Linear (a module path inside a layer, e.g. 'mlp_moe_gen.up_proj') is quantized."""

    path: str
    spec: FormatSpec
    algorithm: str  # 'rtn' | 'awq' | 'gptq' | 'smoothquant'
    params: dict = field(default_factory=dict)


@dataclass
class LayerResult:
    packed: dict[str, PackedTensor]  # module path -> packed weight
    norms: dict[str, torch.Tensor]  # norm module path -> folded weight


def _member_paths(expert: str, members: tuple[str, ...]) -> list[str]:
    return list(members) if expert == "und" else [gen_name(m) for m in members]


def _norm_path(expert: str, group: str) -> str:
    base = NORM_OF_GROUP[group]
    return base if expert == "und" else f"{base}_moe_gen"


def _one(job: LinearJob, w: torch.Tensor, stats: LayerStats | None) -> PackedTensor:
    if job.algorithm in CALIBRATED and stats is None:
        raise ValueError(f"{job.path}: {job.algorithm} needs calibration statistics")
    if job.algorithm == "rtn":
        return rtn(w, stats, job.spec)
    if job.algorithm == "gptq":
        return gptq(w, stats, job.spec, **job.params)
    if job.algorithm == "awq":
        return awq(w, stats, job.spec, **job.params).runtime()
    if job.algorithm == "smoothquant":
        return smoothquant(w, stats, job.spec, **job.params).runtime()
    raise ValueError(f"{job.path}: unknown algorithm {job.algorithm!r}; allowed: rtn, awq, gptq, smoothquant")


def _foldable(jobs: list[LinearJob], group: str) -> bool:
    first = jobs[0]
    return (group in NORM_OF_GROUP and first.algorithm in ("awq", "smoothquant")
            and all(j.algorithm == first.algorithm and j.spec == first.spec and j.params == first.params
                    for j in jobs))


@torch.no_grad()
def quantize_layer(layer: MoTLayer, jobs: dict[str, LinearJob], stats: dict) -> LayerResult:
    """Pack every Linear named in `jobs`; `stats[(expert, group)]` holds its input statistics."""
    result = LayerResult({}, {})
    for expert in ("und", "gen"):
        for group, (_, members) in INPUT_GROUPS.items():
            paths = [p for p in _member_paths(expert, members) if p in jobs]
            if not paths:
                continue
            group_jobs = [jobs[p] for p in paths]
            weights = [layer.get_submodule(p).weight.float() for p in paths]
            s = stats.get((expert, group))
            if len(paths) == len(members) and _foldable(group_jobs, group) and s is not None:
                fn = awq_group if group_jobs[0].algorithm == "awq" else smoothquant_group
                results = fn(weights, s, group_jobs[0].spec, **group_jobs[0].params)
                norm = _norm_path(expert, group)
                result.norms[norm] = fold_into_norm(layer.get_submodule(norm).weight, results[0].input_scale)
                result.packed.update({p: r.packed for p, r in zip(paths, results)})
            else:
                result.packed.update({p: _one(j, w, s) for p, j, w in zip(paths, group_jobs, weights)})
    return result


def install(layer: MoTLayer, result: LayerResult) -> None:
    """Swap the layer's Linears for QLinears and its norms for the folded weights, in place."""
    for path, packed in result.packed.items():
        parent_path, _, name = path.rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        setattr(parent, name, QLinear.from_linear(getattr(parent, name), packed))
    for path, weight in result.norms.items():
        layer.get_submodule(path).weight.data = weight
