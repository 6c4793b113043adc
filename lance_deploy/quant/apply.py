"""Quantize the Linears of one decoder layer from its calibration statistics.

Linears that read the same input (q/k/v after `input_layernorm`, gate/up after
`post_attention_layernorm`: `model.tree.FOLD_GROUPS`) and share an AWQ or SmoothQuant spec
get one input scale s, folded into that RMSNorm's weight (free at run time; the rule is
`registry.folds`). Anything else that uses a scale keeps it as the QLinear's runtime
divisor (`smooth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lance_deploy.checkpoint import canonical as cn
from lance_deploy.formats import FormatSpec, PackedTensor
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.model.mot import MoTLayer
from lance_deploy.model.tree import EXPERTS, INPUT_GROUPS, leaf_module
from lance_deploy.quant.algorithms.registry import ALGORITHMS, REGISTRY, folds
from lance_deploy.quant.algorithms.scaling import fold_into_norm
from lance_deploy.quant.algorithms.stats import LayerStats


@dataclass(frozen=True)
class LinearJob:
    """How one Linear (a module path inside a layer, e.g. 'mlp_moe_gen.up_proj') is quantized."""

    path: str
    spec: FormatSpec
    algorithm: str  # a name of quant/algorithms/registry.py
    params: dict = field(default_factory=dict)

    @property
    def choice(self) -> tuple[FormatSpec, str, dict]:
        """What the fold rule compares (``registry.folds``)."""
        return self.spec, self.algorithm, self.params


def linear_jobs(entries) -> dict[str, LinearJob]:
    """Module path -> LinearJob for plan entries of Linear weights of one layer."""
    return {cn.module_path(e.name): LinearJob(cn.module_path(e.name), e.spec(), e.algorithm, dict(e.params))
            for e in entries}


@dataclass
class LayerResult:
    packed: dict[str, PackedTensor]  # module path -> packed weight
    norms: dict[str, torch.Tensor]  # norm module path -> folded weight
    act_amax: dict[str, float] = field(default_factory=dict)  # W8A8 module path -> calibrated input amax


def _one(job: LinearJob, w: torch.Tensor, stats: LayerStats | None) -> PackedTensor:
    algorithm = REGISTRY.get(job.algorithm)
    if algorithm is None:
        raise ValueError(f"{job.path}: unknown algorithm {job.algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
    if algorithm.calibrated and stats is None:
        raise ValueError(f"{job.path}: {job.algorithm} needs calibration statistics")
    return algorithm.quantize(w, stats, job.spec, **job.params)


@torch.no_grad()
def quantize_layer(layer: MoTLayer, jobs: dict[str, LinearJob], stats: dict) -> LayerResult:
    """Pack every Linear named in `jobs`; `stats[(expert, group)]` holds its input statistics."""
    result = LayerResult({}, {})
    for expert in EXPERTS:
        for name, group in INPUT_GROUPS.items():
            members = group.paths(expert)
            paths = [p for p in members if p in jobs]
            if not paths:
                continue
            group_jobs = [jobs[p] for p in paths]
            weights = [layer.get_submodule(p).weight.float() for p in paths]
            s = stats.get((expert, name))
            choices = [jobs[p].choice if p in jobs else None for p in members]
            if s is not None and group.norm is not None and folds(choices):
                first = group_jobs[0]
                results = REGISTRY[first.algorithm].group(weights, s, first.spec, **first.params)
                norm = leaf_module(group.norm, expert)
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
