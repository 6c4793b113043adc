"""Per-part comparisons of exported graphs against the PyTorch runtime on the same random inputs.

The references are the model's own code paths, not the export wrappers: `MoTLayer.forward` with
a `Routing` and a `KVCache` for the layers, `QwenViT.forward` for the ViT, and the streaming
`WanVAE.decode_frames` / `encode_frames` (freshly loaded, unmodified) for the VAE. The VAE
graphs are checked as a chain (first chunk, then a step fed with the first graph's cache
outputs), which also proves the cache plumbing. Layer graphs run at two or three sizes so the
dynamic axes are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lance_deploy.artifact.graph_manifest import GraphEntry
from lance_deploy.export.parts import LATENT_CHANNELS, layer_inputs
from lance_deploy.export.sources import Source

GEN_SIZES = ((18, 8), (7, 3))  # (n, Lc)
UND_SIZES = ((18, 8, True), (1, 5, True), (7, 0, False))  # prefill chunk, decode step, first vision split

Runner = Callable[[GraphEntry, dict[str, Tensor]], dict[str, Tensor]]


@dataclass
class Comparison:
    """One graph output against its PyTorch reference for one input case."""

    entry: str
    output: str
    case: str
    got: Tensor
    expected: Tensor


def kv_cache(source: Source, layer: int, past_k: Tensor, past_v: Tensor):
    """A KVCache holding a layer graph's past_key / past_value inputs for `layer` (empty when Lc = 0)."""
    from lance_deploy.model.attention import KVCache

    cache = KVCache(source.cfg.num_hidden_layers)
    if past_k.shape[0]:
        cache.keys[layer], cache.values[layer] = past_k, past_v
    return cache


def _layer_cases(source: Source, entries: list[GraphEntry], with_gen: bool, sizes, seed: int):
    """(entry, layer index, layer, size, inputs) for every layer graph at every size in `sizes`
    (each starting (n, Lc)); each layer is loaded once, its inputs seeded by `seed` + layer."""
    for e in entries:
        i = e.meta["layer"]
        layer = source.layer(i, with_gen=with_gen)
        for size in sizes:
            yield e, i, layer, size, layer_inputs(source, size[0], size[1], seed=seed + i)


def check_gen_layer(source: Source, entries: list[GraphEntry], run: Runner) -> list[Comparison]:
    from lance_deploy.model.mot import Routing

    out = []
    for e, i, layer, (n, lc), (x, cos, sin, pk, pv) in _layer_cases(source, entries, True, GEN_SIZES, 1000):
        with torch.no_grad():
            ref = layer(x, (cos, sin), Routing.of(n, torch.arange(1, n - 1)), kv_cache(source, i, pk, pv),
                        False, False)
        got = run(e, dict(hidden=x, cos=cos, sin=sin, past_key=pk, past_value=pv))
        out.append(Comparison(e.name, "hidden_out", f"n={n},Lc={lc}", got["hidden_out"], ref))
    return out


def check_und_layer(source: Source, entries: list[GraphEntry], run: Runner) -> list[Comparison]:
    from lance_deploy.model.mot import Routing

    out = []
    for e, i, layer, (n, lc, causal), (x, cos, sin, pk, pv) in _layer_cases(source, entries, False, UND_SIZES, 2000):
        cache = kv_cache(source, i, pk, pv)
        with torch.no_grad():
            ref = layer(x, (cos, sin), Routing(), cache, causal, True)
        got = run(e, dict(hidden=x, cos=cos, sin=sin, past_key=pk, past_value=pv, causal=torch.tensor([causal])))
        case = f"n={n},Lc={lc},causal={causal}"
        out += [Comparison(e.name, "hidden_out", case, got["hidden_out"], ref),
                Comparison(e.name, "present_key", case, got["present_key"], cache.keys[i]),
                Comparison(e.name, "present_value", case, got["present_value"], cache.values[i])]
    return out


def check_vit(source: Source, entries: list[GraphEntry], run: Runner) -> list[Comparison]:
    vit, out = source.vit(), []
    for e in entries:
        spec = e.inputs[0]
        patches = torch.randn(*spec.shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = vit(patches, torch.tensor([e.meta["grid_thw"]]))
        out.append(Comparison(e.name, "tokens", "random patches", run(e, {"patches": patches})["tokens"], ref))
    return out


def _chain(entries: list[GraphEntry], run: Runner, first_feed: dict, step_feed: dict):
    """Run the first graph, then the step graph on its cache outputs; returns both output dicts."""
    by_role = {e.meta["role"]: e for e in entries}
    if set(by_role) != {"first", "step"}:
        raise ValueError(f"expected a first and a step graph, found {sorted(by_role)}")
    first = run(by_role["first"], first_feed)
    slots = by_role["first"].meta["slots"]
    feed = dict(step_feed, **{f"cache_{k:02d}": first[f"cache_out_{k:02d}"] for k in range(slots)})
    return by_role, first, run(by_role["step"], feed)


def check_vae_decoder(source: Source, entries: list[GraphEntry], run: Runner) -> list[Comparison]:
    from lance_deploy.model.vae_blocks import StreamCache

    vae, (th, tw) = source.vae("decoder"), entries[0].meta["tile"]
    z = torch.randn(1, LATENT_CHANNELS, 2, th, tw, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = vae.decode_frames(vae.denormalize(z), StreamCache())  # [1, 3, 5, 16th, 16tw]
    roles, first, step = _chain(entries, run, {"z": z[:, :, :1]}, {"z": z[:, :, 1:]})
    return [Comparison(roles["first"].name, "pixels", "latent frame 0", first["pixels"], ref[:, :, :1]),
            Comparison(roles["step"].name, "pixels", "latent frame 1", step["pixels"], ref[:, :, 1:])]


def check_vae_encoder(source: Source, entries: list[GraphEntry], run: Runner) -> list[Comparison]:
    from lance_deploy.model.vae_blocks import StreamCache

    vae, (th, tw) = source.vae("encoder"), entries[0].meta["tile"]
    x = torch.rand(1, 3, 5, 16 * th, 16 * tw, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        mu, log_var = vae.encode_frames(x, StreamCache())
    latent = vae.normalize(mu)
    roles, first, step = _chain(entries, run, {"pixels": x[:, :, :1]}, {"pixels": x[:, :, 1:]})
    out = []
    for name, ref in (("latent", latent), ("log_var", log_var)):
        out.append(Comparison(roles["first"].name, name, "pixel frame 0", first[name], ref[:, :, :1]))
        out.append(Comparison(roles["step"].name, name, "pixel frames 1-4", step[name], ref[:, :, 1:]))
    return out


CHECKS = {
    "gen-layer": check_gen_layer,
    "und-layer": check_und_layer,
    "vit": check_vit,
    "vae-decoder": check_vae_decoder,
    "vae-encoder": check_vae_encoder,
}
