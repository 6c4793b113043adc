"""`--backend torch|onnxruntime|tensorrt`: where the denoising query and the VAE decode run.

A backend hands `LancePipeline` two drop-ins (the pipeline keeps everything else in PyTorch):

* `query_fn(lm)` -> f(query, pos, cache), for the step loop's
  `forward_chunk(query, pos, cache, causal=False, gen_rows=1..n-2, update_cache=False)`:
  every layer runs as its ``gen-layer.NN`` graph (`ort_runtime.OrtGenQuery`);
* `decode(vae, latent)`, for `vae.decode(latent)`: fixed-size ``vae-decoder`` tile graphs
  (`ort_runtime.decode_tiled`).

Prefill stays in PyTorch (its K/V cache is an input of the gen-layer graphs), as do the
embeddings, final norms, velocity head, sampler, encoders and the understanding tasks.

Graphs come from an export folder (``--graphs DIR``). Without one, the onnxruntime backend
exports what it needs on first use into a cache (``$LANCE_EXPORT_CACHE``, else the user cache
``$XDG_CACHE_HOME/lance-deploy/onnx`` (default ``~/.cache/lance-deploy/onnx``), else the temp dir;
never inside the checkpoint or its download folder), reused while the checkpoint's
fingerprint is unchanged. The cached VAE tile covers the whole latent up to `TilingConfig`'s
auto threshold (then the decode equals the untiled one), and is `TilingConfig().tile` cells
beyond it. TensorRT needs ``--graphs`` with engines from ``lance-deploy build-engine``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from lance_deploy.core.errors import LanceError, LanceUsageError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
AUTO_PRESET = "image_256res"  # sets only the TensorRT profiles of a cached export; onnxruntime runs any size
CACHE_ENV = "LANCE_EXPORT_CACHE"


def cache_root() -> Path:
    """The first writable of $LANCE_EXPORT_CACHE, <user cache>/onnx, <tmp>/lance-deploy-onnx-cache
    (cache entries are named by the model folder's path, so one root serves every checkpoint)."""
    from lance_deploy.core.cachedir import user_cache_dir

    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    for folder in (user_cache_dir("onnx"), Path(tempfile.gettempdir()) / "lance-deploy-onnx-cache"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise LanceError(f"no writable folder for the ONNX export cache; pass --graphs DIR or set {CACHE_ENV}")


def auto_vae_tile(h: int, w: int) -> tuple[int, int]:
    """Decoder tile for an h x w latent: all of it when torch would not tile it either, else 32-cell tiles."""
    from lance_deploy.model.vae_tiling import TilingConfig

    cfg = TilingConfig()
    if min(h, w) < 2:
        raise LanceUsageError(f"a {h}x{w}-cell latent is too small for VAE tile graphs (2 cells a side at least); "
                              "use --backend torch")
    return (h, w) if not cfg.active(h, w) else (min(h, cfg.tile), min(w, cfg.tile))


class _GraphBackend:
    """The two drop-ins over `layer_graphs(lm)` / `decoder_graphs(latent)` of a subclass."""

    name = "graphs"

    def query_fn(self, lm) -> Callable:
        from lance_deploy.runtime.graphs import OrtGenQuery

        return partial(OrtGenQuery(self.layer_graphs(lm)), lm)

    def decode(self, vae, latent):
        from lance_deploy.runtime.graphs import decode_tiled

        return decode_tiled(self.decoder_graphs(latent), latent)


def _check_layers(graphs, lm) -> None:
    names = {e.name for e in graphs.manifest.parts}
    missing = [f"gen-layer.{i:02d}" for i in range(lm.cfg.num_hidden_layers) if f"gen-layer.{i:02d}" not in names]
    if missing:
        raise LanceUsageError(f"{graphs.root}: no graph {missing[0]} ({len(missing)} gen-layer graphs missing); "
                              "export them with `lance-deploy export onnx --part gen-layer`")


def _check_source(root: Path, manifest, source) -> None:
    """Refuse graphs exported from another checkpoint (their weights would silently differ)."""
    here = {(f["name"], f["size"], f["head_sha256"]) for f in source.fingerprint()["files"]}
    there = {(f["name"], f["size"], f["head_sha256"]) for f in manifest.source.get("files", [])}
    if not there <= here:
        raise LanceUsageError(f"--graphs {root}: exported from a different checkpoint than "
                              f"{source.layout.model_dir}; export it again from this model")


class OrtBackend(_GraphBackend):
    """Exported graphs in onnxruntime (CUDAExecutionProvider first when torch sees a GPU)."""

    name = "onnxruntime"

    def __init__(self, model: Path, graphs: Path | None = None, vit=None, vae=None, variant: str | None = None,
                 log: Callable[[str], None] = lambda s: None):
        from lance_deploy.checkpoint.layout import discover
        from lance_deploy.export.graph_file import onnx_modules
        from lance_deploy.export.sources import open_source

        onnx_modules()  # the install hint before any model is loaded
        # A download folder holds both variants: resolve the one the task runs, as the pipeline does.
        model_dir = discover(model, vit=vit, vae=vae, variant=variant).model_dir
        self.source = open_source(model_dir, vit=vit, vae=vae)
        self.vit, self.vae, self.log = vit, vae, log
        self.fixed = None
        if graphs is not None:
            from lance_deploy.runtime.graphs import OrtGraphs

            self.fixed = OrtGraphs(graphs)
            _check_source(Path(graphs), self.fixed.manifest, self.source)
        self._cached: dict = {}

    def layer_graphs(self, lm):
        graphs = self.fixed or self._export(("gen-layer",), None)
        _check_layers(graphs, lm)
        return graphs

    def decoder_graphs(self, latent):
        if self.fixed is not None:
            self.fixed.entry("vae-decoder.first")  # a usage error naming the part when it is missing
            return self.fixed
        return self._export(("vae-decoder",), auto_vae_tile(int(latent.shape[1]), int(latent.shape[2])))

    def _export(self, parts: tuple[str, ...], tile: tuple[int, int] | None):
        """OrtGraphs of a cache folder holding `parts`, exported unless an identical export is there."""
        from lance_deploy.artifact.graph_manifest import MANIFEST, export_identity, load_manifest
        from lance_deploy.export.onnx_export import ExportRequest, export_onnx
        from lance_deploy.runtime.graphs import OrtGraphs

        key = (parts, tile)
        if key not in self._cached:
            model_dir = self.source.layout.model_dir.resolve()
            tag = hashlib.sha256(str(model_dir).encode()).hexdigest()[:8]
            name = f"{model_dir.name}-{tag}-{'+'.join(parts)}" + (f"-{tile[0]}x{tile[1]}" if tile else "")
            out = cache_root() / name
            req = ExportRequest(model=model_dir, parts=parts, preset=AUTO_PRESET, out=out, vae_tile=tile,
                                force=True, vit=self.vit, vae=self.vae)
            identity = export_identity(self.source.fingerprint(), req.identity_fields())
            if not ((out / MANIFEST).is_file() and load_manifest(out).identity() == identity):
                self.log(f"exporting {'+'.join(parts)} for --backend onnxruntime into {out}")
                export_onnx(req, self.log)
            self._cached[key] = OrtGraphs(out)
        return self._cached[key]


class TensorRTBackend(_GraphBackend):
    """TensorRT engines built from an export folder by `lance-deploy build-engine` (CUDA only)."""

    name = "tensorrt"

    def __init__(self, graphs: Path | None):
        from lance_deploy.runtime.tensorrt import tensorrt_module

        tensorrt_module()  # LanceError with the install hint (exit 1) when TensorRT is absent
        if graphs is None:
            raise LanceUsageError("--backend tensorrt needs --graphs DIR: an export folder whose engines were "
                                  "built on this GPU with `lance-deploy build-engine`")
        from lance_deploy.runtime.graphs import TrtGraphs

        self.graphs = TrtGraphs(graphs)

    def layer_graphs(self, lm):
        _check_layers(self.graphs, lm)
        return self.graphs

    def decoder_graphs(self, latent):
        return self.graphs


def make_backend(name: str, model: Path, graphs: Path | None = None, vit=None, vae=None,
                 variant: str | None = None, log: Callable[[str], None] = lambda s: None):
    """The backend object for `LancePipeline(backend=...)`; None for torch (the default path).

    `variant` ('image' / 'video') picks the model of a download folder, as `discover` does.
    """
    if name not in BACKENDS:
        raise LanceUsageError(f"--backend {name!r} is unknown; choose from {', '.join(BACKENDS)}")
    if name == "tensorrt":
        return TensorRTBackend(graphs)
    if graphs is not None and name == "torch":
        raise LanceUsageError("--graphs needs --backend onnxruntime or tensorrt")
    if name == "torch":
        return None
    from lance_deploy.artifact.load import is_artifact

    if graphs is None and is_artifact(model):
        # Its graphs would be exported from fp32 release weights and silently differ from the
        # quantized model; Q/DQ graphs of QLinear layers come from `export.qdq.export_qdq_graph`.
        raise LanceUsageError(f"--backend {name} cannot export graphs from the quantized artifact {model} yet; "
                              "use --backend torch, or pass --graphs with graphs exported from it")
    return OrtBackend(model, graphs, vit=vit, vae=vae, variant=variant, log=log)
