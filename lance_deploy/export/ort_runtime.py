"""Run exported graphs inside the PyTorch pipeline: the seam for `--backend onnxruntime`.

Two drop-ins, both fed by an export folder:

* `OrtGenQuery` replaces `LanceLM.forward_chunk` for the denoising query (markers + latents
  against a read-only cache): every layer runs as its `gen-layer.NN` graph; the KV cache still
  comes from the PyTorch prefill, and the final per-expert norm runs in PyTorch.
* `decode_tiled` replaces `WanVAE.decode`: the spatial tile loop, the per-tile causal stream
  (first graph, then step graphs carrying the cache tensors) and the feathered blending of the
  overlaps run here in Python; only fixed-size tiles go through the graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lance_deploy.errors import LanceUsageError
from lance_deploy.export.manifest import GraphEntry, load_manifest, safe_relative
from lance_deploy.export.verify import providers


class OrtGraphs:
    """onnxruntime sessions of one export folder, opened on first use."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self._sessions: dict = {}

    def entry(self, name: str) -> GraphEntry:
        try:
            return self.manifest.entry(name)
        except KeyError:
            raise LanceUsageError(f"{self.root}: no graph {name!r} in manifest.json "
                                  f"(export the part that provides it)") from None

    def run(self, name: str, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        if name not in self._sessions:
            import onnxruntime as ort

            path = safe_relative(self.root, self.entry(name).file, name)
            self._sessions[name] = ort.InferenceSession(str(path), providers=[p for p, _ in providers()],
                                                        provider_options=[o for _, o in providers()])
        s = self._sessions[name]
        out = s.run(None, {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()})
        return {o.name: torch.from_numpy(a) for o, a in zip(s.get_outputs(), out)}


class OrtGenQuery:
    """`forward_chunk(query, pos, cache, causal=False, gen_rows=1..n-2, update_cache=False)` via gen-layer graphs."""

    def __init__(self, graphs: OrtGraphs):
        self.graphs = graphs

    def __call__(self, model, query: Tensor, pos: Tensor, cache) -> Tensor:
        from lance_deploy.model.rope import mrope_cos_sin

        cfg = model.cfg
        cos, sin = mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, torch.float32)
        x = query.float()
        for i in range(cfg.num_hidden_layers):
            feeds = dict(hidden=x, cos=cos, sin=sin, past_key=cache.keys[i].float(), past_value=cache.values[i].float())
            x = self.graphs.run(f"gen-layer.{i:02d}", feeds)["hidden_out"]
        backbone = model.language_model.model
        x = x.to(device=query.device, dtype=query.dtype)
        # Final norm per expert, as `route(x, routing, norm, norm_moe_gen)` does for this routing.
        return torch.cat([backbone.norm(x[:1]), backbone.norm_moe_gen(x[1:-1]), backbone.norm(x[-1:])])


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), overlapping by >= `overlap`."""
    if length < tile:
        raise LanceUsageError(f"latent side {length} is smaller than the exported VAE tile {tile}; "
                              "export at a smaller preset")
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(size: int, fade: int, left: bool, right: bool) -> Tensor:
    """1-D blend weights: linear fade over `fade` pixels on the sides that have a neighbour."""
    w = torch.ones(size)
    ramp = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
    if left:
        w[:fade] = ramp
    if right:
        w[-fade:] = ramp.flip(0)
    return w


def _decode_stream(graphs: OrtGraphs, z: Tensor, slots: int) -> Tensor:
    """One tile's latent frames [1, 48, t, th, tw] -> pixels [1, 3, 1+4(t-1), 16th, 16tw] via first/step graphs."""
    out = graphs.run("vae-decoder.first", {"z": z[:, :, :1]})
    frames = [out["pixels"]]
    for k in range(1, z.shape[2]):
        feeds = {"z": z[:, :, k:k + 1], **{f"cache_{j:02d}": out[f"cache_out_{j:02d}"] for j in range(slots)}}
        out = graphs.run("vae-decoder.step", feeds)
        frames.append(out["pixels"])
    return torch.cat(frames, dim=2)


def decode_tiled(graphs: OrtGraphs, latent: Tensor) -> Tensor:
    """Normalised latent [t, h, w, 48] -> video [3, 1+4(t-1), 16h, 16w] in [-1, 1], like `WanVAE.decode`."""
    meta = graphs.entry("vae-decoder.first").meta
    (th, tw), overlap, slots = meta["tile"], meta["overlap"], meta["slots"]
    t, h, w, _ = latent.shape
    z = latent.float().permute(3, 0, 1, 2).unsqueeze(0)  # [1, 48, t, h, w]
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    fade = 16 * overlap
    acc = torch.zeros(3, 1 + 4 * (t - 1), 16 * h, 16 * w)
    weight = torch.zeros(1, 1, 16 * h, 16 * w)
    for y in ys:
        for x in xs:
            pixels = _decode_stream(graphs, z[:, :, :, y:y + th, x:x + tw].contiguous(), slots)[0]
            wy = _ramp(16 * th, fade, y > 0, y != ys[-1])
            wx = _ramp(16 * tw, fade, x > 0, x != xs[-1])
            wt = (wy[:, None] * wx[None, :])[None, None]  # [1, 1, 16th, 16tw]
            rows, cols = slice(16 * y, 16 * (y + th)), slice(16 * x, 16 * (x + tw))
            acc[:, :, rows, cols] += pixels * wt
            weight[:, :, rows, cols] += wt
    return (acc / weight).clamp_(-1.0, 1.0)
