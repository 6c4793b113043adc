"""What each part exports: the wrapper modules, example inputs, axis names and profiles.

Each builder yields `GraphJob`s one at a time, so a layer's weights are freed before the next
layer is loaded. Input/output shapes in the manifest are read back from the exported ONNX file,
so they describe the graph itself, not what we meant to export.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lance_deploy.export.graphs import GenLayerGraph, UndLayerGraph, ViTGraph
from lance_deploy.export.presets import TRACE_TOKENS, PresetShapes
from lance_deploy.export.sources import Source
from lance_deploy.export.vae_graphs import DecoderChunkGraph, EncoderChunkGraph, make_exportable, step_slot_shapes
from lance_deploy.model.rope import mrope_cos_sin

LATENT_CHANNELS = 48


@dataclass
class GraphJob:
    """One graph to trace: module + example inputs + names (+ dynamic axes and their profiles)."""

    name: str
    part: str
    module: nn.Module
    args: tuple[Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    profiles: dict[str, list[int]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def layer_inputs(source: Source, n: int, lc: int, seed: int) -> tuple[Tensor, ...]:
    """Random (hidden, cos, sin, past_key, past_value) with cos/sin from real MRoPE positions."""
    cfg = source.cfg
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4 * (n + lc) + 8, (3, n), generator=g)
    cos, sin = mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, torch.float32)
    kv = (lc, cfg.num_key_value_heads, cfg.head_dim)
    return (torch.randn(n, cfg.hidden_size, generator=g), cos, sin,
            torch.randn(kv, generator=g), torch.randn(kv, generator=g))


LAYER_AXES = {"hidden": {0: "n"}, "cos": {0: "n"}, "sin": {0: "n"}, "past_key": {0: "Lc"},
              "past_value": {0: "Lc"}, "hidden_out": {0: "n"}}
"""Dynamic axes of a layer graph; an und layer also returns its KV cache (``UND_LAYER_AXES``)."""
UND_LAYER_AXES = dict(LAYER_AXES, present_key={0: "Lc_plus_n"}, present_value={0: "Lc_plus_n"})


def gen_layer_jobs(source: Source, shapes: PresetShapes, layers: list[int]) -> Iterator[GraphJob]:
    for i in layers:
        module = GenLayerGraph(source.layer(i, with_gen=True))
        yield GraphJob(f"gen-layer.{i:02d}", "gen-layer", module, layer_inputs(source, *TRACE_TOKENS, seed=i),
                       list(module.input_names), list(module.output_names), dict(LAYER_AXES),
                       {"n": shapes.gen_tokens.as_list(), "Lc": shapes.context.as_list()}, {"layer": i})


def und_layer_jobs(source: Source, shapes: PresetShapes, layers: list[int]) -> Iterator[GraphJob]:
    # The first prefill chunk has no past: Lc may be 0 (onnxruntime handles empty tensors).
    context = [0, *shapes.context.as_list()[1:]]
    for i in layers:
        module = UndLayerGraph(source.layer(i, with_gen=False))
        args = (*layer_inputs(source, *TRACE_TOKENS, seed=i), torch.tensor([True]))
        yield GraphJob(f"und-layer.{i:02d}", "und-layer", module, args, list(module.input_names),
                       list(module.output_names), dict(UND_LAYER_AXES),
                       {"n": shapes.und_tokens.as_list(), "Lc": context}, {"layer": i})


def vit_jobs(source: Source, shapes: PresetShapes, layers: list[int]) -> Iterator[GraphJob]:
    module = ViTGraph(source.vit(), shapes.vit_grid)
    c = source.vision
    n = shapes.vit_grid[1] * shapes.vit_grid[2]
    row = c.in_chans * c.temporal_patch_size * c.patch_size**2
    patches = torch.randn(n, row, generator=torch.Generator().manual_seed(0))
    yield GraphJob("vit", "vit", module, (patches,), list(module.input_names), list(module.output_names),
                   meta={"grid_thw": list(shapes.vit_grid), "aspect": shapes.aspect})


def _vae_jobs(part: str, graph_cls, vae, first_in: Tensor, step_in: Tensor, outs: list[str], meta: dict):
    slots = step_slot_shapes(graph_cls, vae, first_in, step_in)
    cin = [f"cache_{i:02d}" for i in range(len(slots))]
    cout = [f"cache_out_{i:02d}" for i in range(len(slots))]
    first, step = graph_cls(vae, slots).eval(), graph_cls(vae, None).eval()
    zeros = tuple(torch.zeros(s) for s in slots)
    name_in = "z" if part == "vae-decoder" else "pixels"
    yield GraphJob(f"{part}.first", part, first, (first_in,), [name_in], outs + cout,
                   meta=dict(meta, role="first", frames_in=int(first_in.shape[2]), slots=len(slots)))
    yield GraphJob(f"{part}.step", part, step, (step_in, *zeros), [name_in] + cin, outs + cout,
                   meta=dict(meta, role="step", frames_in=int(step_in.shape[2]), slots=len(slots)))


def vae_decoder_jobs(source: Source, shapes: PresetShapes, layers: list[int]) -> Iterator[GraphJob]:
    vae = make_exportable(source.vae("decoder"))
    th, tw = shapes.vae_tile
    z = torch.randn(1, LATENT_CHANNELS, 1, th, tw, generator=torch.Generator().manual_seed(0))
    meta = {"tile": [th, tw], "overlap": shapes.vae_overlap}
    yield from _vae_jobs("vae-decoder", DecoderChunkGraph, vae, z, z.clone(), ["pixels"], meta)


def vae_encoder_jobs(source: Source, shapes: PresetShapes, layers: list[int]) -> Iterator[GraphJob]:
    vae = make_exportable(source.vae("encoder"))
    th, tw = shapes.vae_tile
    x = torch.rand(1, 3, 5, 16 * th, 16 * tw, generator=torch.Generator().manual_seed(0)) * 2 - 1
    meta = {"tile": [th, tw], "overlap": shapes.vae_overlap}
    yield from _vae_jobs("vae-encoder", EncoderChunkGraph, vae, x[:, :, :1], x[:, :, 1:], ["latent", "log_var"], meta)


BUILDERS = {
    "gen-layer": gen_layer_jobs,
    "und-layer": und_layer_jobs,
    "vit": vit_jobs,
    "vae-decoder": vae_decoder_jobs,
    "vae-encoder": vae_encoder_jobs,
}
