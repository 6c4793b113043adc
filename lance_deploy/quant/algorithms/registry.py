"""The algorithms by the names recipes use, and the rule for folding their scales into a norm.

Everything that needs to know an algorithm (recipe validation, `quant/apply.py`, the layer
loop, the plan) reads this table, so a new algorithm is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lance_deploy.formats import FormatSpec, PackedTensor

from .awq import awq, awq_group
from .gptq import gptq
from .rtn import rtn
from .smoothquant import smoothquant, smoothquant_group


@dataclass(frozen=True)
class Algorithm:
    """One algorithm.

    quantize:   (weight [out, in], LayerStats | None, FormatSpec, **params) -> PackedTensor; a
                scaling method's input scale stays with it as the QLinear's runtime divisor.
    params:     keyword arguments ``quantize`` accepts, with their types.
    calibrated: needs the LayerStats of its input.
    hessian:    reads the Hessian of those stats (collected only where such an algorithm runs).
    group:      (weights, stats, spec, **params) -> results sharing one input scale, which can
                fold into the RMSNorm before them (AWQ, SmoothQuant); None for the others.
    """

    quantize: Callable[..., PackedTensor]
    params: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    calibrated: bool = False
    hessian: bool = False
    group: Callable[..., list] | None = None


def _awq(weight, stats, spec: FormatSpec, **params) -> PackedTensor:
    return awq(weight, stats, spec, **params).runtime()


def _smoothquant(weight, stats, spec: FormatSpec, **params) -> PackedTensor:
    return smoothquant(weight, stats, spec, **params).runtime()


REGISTRY: dict[str, Algorithm] = {
    "rtn": Algorithm(rtn),
    "awq": Algorithm(_awq, {"grid": (int,), "clip": (bool,)}, calibrated=True, group=awq_group),
    "gptq": Algorithm(gptq, {"block_size": (int,), "damp": (float, int), "act_order": (bool,)},
                      calibrated=True, hessian=True),
    # alpha null: search alpha per layer
    "smoothquant": Algorithm(_smoothquant, {"alpha": (float, int, type(None))}, calibrated=True,
                             group=smoothquant_group),
    "none": Algorithm(rtn),  # bf16: packing a bf16 spec stores the weight as it is
}

ALGORITHMS = tuple(REGISTRY)
QUANTIZING = tuple(name for name in REGISTRY if name != "none")
"""The algorithms of quantized formats (bf16 takes 'none')."""
CALIBRATED = tuple(name for name, a in REGISTRY.items() if a.calibrated)
HESSIAN = tuple(name for name, a in REGISTRY.items() if a.hessian)


def folds(members: Sequence[tuple[FormatSpec, str, Mapping] | None]) -> bool:
    """The fold rule: the (spec, algorithm, params) of each member of a fold group (None: not
    quantized). Their input scale folds into the group's RMSNorm (free at run time) only when
    every member is quantized by the same scaling algorithm with the same spec and params;
    otherwise each scaling member keeps its own runtime divisor (``smooth``)."""
    if not members or any(m is None for m in members):
        return False
    algorithm = REGISTRY.get(members[0][1])
    return algorithm is not None and algorithm.group is not None and all(m == members[0] for m in members)
