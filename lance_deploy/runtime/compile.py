"""`--compile`: torch.compile the two tensor stages of each backbone layer, not the whole model.

A layer is the unit the pager swaps: `before_layer` / `after_layer` run between compiled calls,
in plain Python, so streaming keeps working. Each `MoTLayer` runs `pre_attention` (norm, q/k/v,
QK-norm, rotary), then the KV-cache attention, then `post_attention` (o_proj, residual, MLP);
only the two outer stages are compiled. The cache is per-layer Python state (a list indexed by
the layer number), so compiling it would specialise one graph per layer; left outside, every
layer shares the same graphs (the first may add a variant when its input is a view, a slice of a
prefill chunk), and the weights are graph inputs, not constants, so pointing them at a pager
slot is no recompile (tests/runtime/test_compile.py counts both).

The default mode has no CUDA graphs: a graph would capture the slot addresses of one load and
the dynamic-shape prefill splits would re-record it. `mode="max-autotune-no-cudagraphs"` is the
heavier option on a GPU; "reduce-overhead" (CUDA graphs) is left to callers who know their
shapes are fixed and nothing streams. Shapes are dynamic from the first compile: prefill splits and
requests change the row count anyway, so a static first graph would only be compiled to be replaced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

STAGES = ("pre_attention", "post_attention")


def compile_layers(lm: nn.Module, *, mode: str | None = None, backend: str | Callable = "inductor",
                   dynamic: bool | None = True) -> int:
    """Compile the stages of every `MoTLayer` of `lm` (a `LanceLM`) in place; returns how many
    layers. `backend`: a torch.compile backend name or callable. Calling it again on the same
    model changes nothing."""
    layers = lm.language_model.model.layers
    for layer in layers:
        for stage in STAGES:
            if stage not in layer.__dict__:  # not yet wrapped (the instance attribute shadows the method)
                fn = torch.compile(getattr(layer, stage), mode=mode, backend=backend, dynamic=dynamic)
                object.__setattr__(layer, stage, fn)
    return len(layers)
