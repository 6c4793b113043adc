"""Load exactly the modules one exported graph needs, and fingerprint the checkpoint they came from.

Layers are loaded one at a time (a release layer with both experts is ~0.6 GB in float32), so
exporting all 36 never holds the whole backbone. Export and verify use the same loaders, which
keeps the PyTorch reference of `verify` identical to what was traced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lance_deploy.checkpoint.layout import ReleaseLayout, discover
from lance_deploy.checkpoint.loader import load_layer, load_new
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.config import LLMConfig, VisionConfig
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.model.meta import build_on_meta
from lance_deploy.model.tree import layer_prefix

HEAD_BYTES = 1 << 20  # fingerprint: size + sha256 of the first MiB (covers a safetensors header)


def _file_fingerprint(path: Path) -> dict:
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return {"name": path.name, "size": path.stat().st_size, "head_sha256": head}


@dataclass
class Source:
    """A Lance checkpoint opened for export: its layout, configs and module loaders."""

    layout: ReleaseLayout
    cfg: LLMConfig
    vision: VisionConfig

    def fingerprint(self) -> dict:
        """Identity of the weights: file names, sizes and head hashes (no full-file hashing)."""
        files = [self.layout.weights_file]
        if self.layout.vit_file is not None and not self.layout.has_bundled_vit:
            files.append(self.layout.vit_file)
        if self.layout.vae_file is not None:
            files.append(self.layout.vae_file)
        return {"model_dir": str(self.layout.model_dir.resolve()), "variant": self.layout.variant,
                "files": [_file_fingerprint(p) for p in files]}

    def layer(self, index: int, with_gen: bool):
        """MoT layer `index` in float32 on the CPU (with or without the generation expert)."""
        _check_layer(self.cfg, index)
        with SafetensorsReader(self.layout.weights_file) as reader:
            return load_layer(reader, self.cfg, index, with_gen=with_gen)

    def vit(self):
        """The ViT the model uses (bundled `vit_model.*` wins, as upstream), float32 on the CPU."""
        from lance_deploy.model.vit import QwenViT

        src = self.layout.require_vit()
        with SafetensorsReader(src.file) as reader:
            return load_new(lambda: QwenViT(self.vision), reader, dtype=torch.float32, prefix=src.prefix)

    def vae(self, part: str):
        """The VAE with only `part` ('encoder' or 'decoder') materialised, float32 on the CPU."""
        from lance_deploy.model.vae import load_vae

        return load_vae(self.layout.require_vae(), dtype=torch.float32, device="cpu", parts=(part,))


def _check_layer(cfg: LLMConfig, index: int) -> None:
    if not 0 <= index < cfg.num_hidden_layers:
        raise LanceUsageError(f"--layers {index}: the model has layers 0..{cfg.num_hidden_layers - 1}")


@dataclass
class ArtifactSource:
    """A quantized artifact opened for export: its Linears load as QLinears (Q/DQ graphs)."""

    path: Path
    cfg: LLMConfig
    static_activations: bool = False  # W8A8 layers use their calibrated static scales (--target tensorrt)

    @property
    def vision(self) -> VisionConfig:
        return self.cfg.vision

    def _reader(self):
        from lance_deploy.artifact.reader import ArtifactReader

        return ArtifactReader(self.path)

    def fingerprint(self) -> dict:
        manifest = self.path / "manifest.json"
        return {"model_dir": str(self.path.resolve()), "variant": self._reader().manifest.source.get("variant"),
                "files": [_file_fingerprint(manifest)]}

    def layer(self, index: int, with_gen: bool):
        from lance_deploy.artifact.load import load_module
        from lance_deploy.checkpoint import canonical as cn
        from lance_deploy.model.mot import MoTLayer

        _check_layer(self.cfg, index)
        prefix = layer_prefix(index)
        layer = build_on_meta(lambda: MoTLayer(self.cfg, index, with_gen), lambda layer: load_module(
            layer, self._reader(), lambda k: cn.to_canonical(prefix + k), torch.float32, "cpu"))
        if self.static_activations:
            from lance_deploy.export.qdq import static_activations

            static_activations(layer, f"{self.path}: layer {index}")
        return layer

    def vit(self):
        from lance_deploy.artifact.load import load_artifact_vit

        return load_artifact_vit(self._reader(), self.cfg, torch.float32, "cpu")

    def vae(self, part: str):
        from lance_deploy.artifact.load import load_artifact_vae

        return load_artifact_vae(self._reader(), (part,), torch.float32, "cpu")


def open_source(model: str | Path, vit: str | Path | None = None, vae: str | Path | None = None):
    """Locate and describe a checkpoint or quantized artifact; a missing or malformed one is a usage
    error (exit 2)."""
    from lance_deploy.artifact.load import is_artifact

    if is_artifact(model):
        from lance_deploy.artifact.reader import ArtifactReader

        return ArtifactSource(Path(model), ArtifactReader(model).config())
    layout = discover(model, vit=vit, vae=vae)
    cfg = LLMConfig.from_file(layout.config_file)
    return Source(layout=layout, cfg=cfg, vision=layout.vision_config(cfg))
