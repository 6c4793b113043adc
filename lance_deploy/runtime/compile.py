"""`--compile`: torch.compile each backbone layer, not the whole model.

A layer is the unit the pager swaps: `before_layer` / `after_layer` run between compiled calls,
in plain Python, so streaming keeps working, and every layer shares one compiled graph (the
weights are graph inputs, not constants, so pointing them at a slot is no recompile). The
default mode has no CUDA graphs: a graph would capture the slot addresses of one load and the
dynamic-shape prefill splits would re-record it. `mode="max-autotune-no-cudagraphs"` is the
heavier option on a GPU; "reduce-overhead" (CUDA graphs) is left to callers who know their
shapes are fixed and nothing streams.
"""

from __future__ import annotations

from torch import nn


def compile_layers(lm: nn.Module, *, mode: str | None = None, backend: str = "inductor",
                   dynamic: bool | None = None) -> int:
    """Compile every `MoTLayer` of `lm` (a `LanceLM`) in place; returns how many."""
    layers = lm.language_model.model.layers
    for layer in layers:
        layer.compile(mode=mode, backend=backend, dynamic=dynamic)
    return len(layers)
