"""Replay recorded programs through one decoder layer at a time.

Layer L's inputs are layer L-1's outputs for every recorded call, so calibration holds one
layer's weights and the programs' hidden states, never the whole model. Each program gets its
own KV caches per layer, rebuilt from its prefill calls, exactly as the full model builds them.
"""

from __future__ import annotations

import torch
from torch import nn

from lance_deploy.calibrate.record import Program
from lance_deploy.config import LLMConfig
from lance_deploy.core.progress import bar
from lance_deploy.model.attention import KVCache
from lance_deploy.model.mot import MoTLayer, Routing
from lance_deploy.model.rope import mrope_cos_sin
from lance_deploy.model.tree import EXPERTS, INPUT_GROUPS


def _cos_sin(cfg: LLMConfig, pos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    return mrope_cos_sin(pos.to(device), cfg.head_dim, cfg.rope_theta, cfg.mrope_section, torch.float32)


@torch.no_grad()
def run_layer(
    layer: MoTLayer, cfg: LLMConfig, programs: list[Program], inputs: list[list[torch.Tensor]], device,
    desc: str = "replay",
) -> list[list[torch.Tensor]]:
    """Outputs of `layer` for every call of every program, given that layer's inputs (`desc` names
    the pass on its progress bar)."""
    outputs = []
    dtype = next(layer.parameters()).dtype if any(True for _ in layer.parameters()) else torch.float32
    # shown only under a command's progress mode, and only once a replay lasts over REPLAY_DELAY_S
    with bar(len(programs), f"{desc} layer {layer_index(layer)}", unit="program", enabled=None,
             delay=REPLAY_DELAY_S) as b:
        for program, xs in zip(programs, inputs):
            caches: dict[int, KVCache] = {}
            outs = []
            for call, x in zip(program.calls, xs):
                cache = caches.setdefault(call.cache, KVCache(cfg.num_hidden_layers))
                routing = Routing.of(x.shape[0], call.gen_rows, device)
                h = layer(x.to(device, dtype), _cos_sin(cfg, call.pos, device), routing, cache, call.causal,
                          call.update_cache)
                outs.append(h.cpu())
            outputs.append(outs)
            if b is not None:
                b.update(1)
    return outputs


REPLAY_DELAY_S = 2.0


def layer_index(layer: MoTLayer) -> int | str:
    return getattr(layer.self_attn, "layer", "?")


def observe(layer: MoTLayer, stats_for) -> list:
    """Forward hooks feeding each input group's LayerStats (``model.tree.INPUT_GROUPS``, observed
    at the group's probe Linear); returns the hook handles.

    `stats_for(expert, group)` returns the LayerStats of that expert's group ('und' / 'gen').
    """
    handles = []
    for name, group in INPUT_GROUPS.items():
        for expert in EXPERTS:
            path = group.probe(expert)
            if not _has(layer, path):
                continue
            stats = stats_for(expert, name)
            handles.append(layer.get_submodule(path).register_forward_hook(_feeder(stats)))
    return handles


def _feeder(stats):
    def hook(module, args, output):
        stats.update(args[0])  # returns None: a hook's return value would replace the output

    return hook


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False
