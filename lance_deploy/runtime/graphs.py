"""Run exported graphs inside the PyTorch pipeline: the seam for `--backend onnxruntime`.

Two drop-ins, both fed by an export folder:

* `OrtGenQuery` replaces `LanceLM.forward_chunk` for the denoising query (markers + latents
  against a read-only cache): every layer runs as its `gen-layer.NN` graph; the KV cache still
  comes from the PyTorch prefill, and the final per-expert norm runs in PyTorch.
* `decode_tiled` replaces `WanVAE.decode`: the spatial tile loop, the per-tile causal stream
  (first graph, then step graphs carrying the cache tensors) and the feathered blending of the
  overlaps run here in Python; only fixed-size tiles go through the graphs. The tile plan and
  the feather weights are `model.vae_tiling`'s, so several tiles reproduce the torch
  `tiled_decode(..., TilingConfig(tile, overlap, global_attention=False))` (each tile runs the
  whole VAE, as the graph does); one tile covering the latent reproduces the untiled decode.

Both only use `graphs.entry(name)` and `graphs.run(name, feeds)`, so the TensorRT backend
(`backend.TrtGraphs`) reuses them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lance_deploy.artifact.graph_manifest import GraphEntry, load_manifest, safe_relative
from lance_deploy.core.errors import LanceError, LanceUsageError
from lance_deploy.core.optional import require


def providers() -> list[tuple[str, dict]]:
    """CUDA (TF32 off, so fp32 stays fp32) when a GPU is visible, else the CPU provider."""
    ort = require("onnxruntime")
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), ("CPUExecutionProvider", {})]
    return [("CPUExecutionProvider", {})]


def session_options():
    """onnxruntime options that keep a Q/DQ graph's numerics those of our reference path.

    With its QDQ fusions on, onnxruntime turns DequantizeLinear -> MatMul into MatMulNBits /
    MatMulIntegerToFloat, which quantize the activations too (rel. error ~6e-3 on an int8
    weight-only layer) and reject float8 activations. Without them the weight DQ is folded once
    into a float matrix and the graph computes what `QLinear` computes; fp32 graphs are unaffected.
    """
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options


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
            ort = require("onnxruntime")
            path = safe_relative(self.root, self.entry(name).file, name)
            self._sessions[name] = ort.InferenceSession(str(path), session_options(),
                                                        providers=[p for p, _ in providers()],
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


def _decode_stream(graphs, z: Tensor, slots: int) -> Tensor:
    """One tile's latent frames [1, 48, t, th, tw] -> pixels [1, 3, 1+4(t-1), 16th, 16tw] via first/step graphs."""
    out = graphs.run("vae-decoder.first", {"z": z[:, :, :1]})
    frames = [out["pixels"]]
    for k in range(1, z.shape[2]):
        feeds = {"z": z[:, :, k:k + 1], **{f"cache_{j:02d}": out[f"cache_out_{j:02d}"] for j in range(slots)}}
        out = graphs.run("vae-decoder.step", feeds)
        frames.append(out["pixels"])
    return torch.cat(frames, dim=2)


def decoder_tiling(graphs) -> tuple[tuple[int, int], int]:
    """((tile_h, tile_w), overlap) in latent cells of the exported decoder tile graphs."""
    meta = graphs.entry("vae-decoder.first").meta
    return tuple(meta["tile"]), int(meta["overlap"])


def decode_tiled(graphs, latent: Tensor) -> Tensor:
    """Normalised latent [t, h, w, 48] -> video [3, 1+4(t-1), 16h, 16w] in [-1, 1], like `WanVAE.decode`.

    Tiles follow `vae_tiling.tile_spans` per axis (the graph's tile may be non-square) and are
    blended with `vae_tiling.axis_weights`, accumulated in the same order as `_blend_tiles`.
    """
    from lance_deploy.model.vae_tiling import SPATIAL_FACTOR as S
    from lance_deploy.model.vae_tiling import axis_weights, tile_spans

    (th, tw), overlap = decoder_tiling(graphs)
    slots = graphs.entry("vae-decoder.first").meta["slots"]
    t, h, w, _ = latent.shape
    if h < th or w < tw:
        raise LanceUsageError(f"latent {h}x{w} cells is smaller than the exported VAE tile {th}x{tw}; "
                              "export the vae-decoder with a smaller --vae-tile")
    z = latent.detach().float().cpu().permute(3, 0, 1, 2).unsqueeze(0)  # [1, 48, t, h, w]
    ys, xs = tile_spans(h, th, overlap), tile_spans(w, tw, overlap)
    wy, wx = axis_weights(ys, S), axis_weights(xs, S)
    canvas = torch.zeros(1, 3, 1 + 4 * (t - 1), S * h, S * w)
    for (y0, y1), ay in zip(ys, wy):
        for (x0, x1), ax in zip(xs, wx):
            pixels = _decode_stream(graphs, z[:, :, :, y0:y1, x0:x1].contiguous(), slots).float().cpu()
            canvas[..., y0 * S:y1 * S, x0 * S:x1 * S].add_(pixels * (ay.view(-1, 1) * ax.view(1, -1)))
    return canvas[0].clamp_(-1.0, 1.0)


def _torch_dtype(trt, dtype):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, torch_dtype in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8),
                              ("FP8", torch.float8_e4m3fn)):
        if hasattr(trt.DataType, name):  # newer TensorRT releases only
            table[getattr(trt.DataType, name)] = torch_dtype
    return table[dtype]


class TrtGraphs:
    """TensorRT engines of one export folder, the same `entry` / `run` interface as `OrtGraphs`.

    Engines are read from ``engines/<gpu>-sm<XY>/<graph>.plan`` through `runtime.tensorrt.load_engine`,
    which refuses an engine built for another GPU or TensorRT version. Tensors stay on the GPU:
    inputs are copied to CUDA in the engine's dtype, outputs are allocated from the shapes the
    execution context infers once the input shapes are set (TensorRT 10 tensor API).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self._engines: dict = {}

    entry = OrtGraphs.entry

    def _context(self, name: str):
        from lance_deploy.runtime.tensorrt import engine_dir, gpu_identity, load_engine

        if name not in self._engines:
            self.entry(name)
            plan = engine_dir(self.root, gpu_identity()) / f"{name}.plan"
            if not plan.is_file():
                raise LanceUsageError(f"{plan}: no engine for graph {name}; build it on this GPU with "
                                      f"`lance-deploy build-engine {self.root} --precision fp16`")
            engine = load_engine(plan)
            self._engines[name] = (engine, engine.create_execution_context())
        return self._engines[name]

    def run(self, name: str, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        from lance_deploy.runtime.tensorrt import tensorrt_module

        trt = tensorrt_module()
        engine, context = self._context(name)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        alive, outputs = [], {}
        for n in (n for n in names if is_input[n]):
            t = feeds[n].to("cuda", _torch_dtype(trt, engine.get_tensor_dtype(n))).contiguous()
            context.set_input_shape(n, tuple(t.shape))
            context.set_tensor_address(n, t.data_ptr())
            alive.append(t)  # keep the input buffers alive until the engine has run
        for n in (n for n in names if not is_input[n]):
            out = torch.empty(tuple(context.get_tensor_shape(n)), device="cuda",
                              dtype=_torch_dtype(trt, engine.get_tensor_dtype(n)))
            context.set_tensor_address(n, out.data_ptr())
            outputs[n] = out
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise LanceError(f"TensorRT failed to run graph {name}")
        stream.synchronize()
        return outputs
