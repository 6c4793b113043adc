"""Load exactly the components a task needs, streamed tensor by tensor.

Modules are built on the meta device and each weight is read with a positioned
read, cast to the target dtype and placed on the device, so host RAM never holds
a full-precision copy of the checkpoint. x2t loads no generation expert and no
VAE; t2i/t2v load no ViT and only the VAE decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lance_deploy.checkpoint.layout import ReleaseLayout
from lance_deploy.checkpoint.loader import load_new
from lance_deploy.checkpoint.names import check_keys, expected_lance_shapes
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.config import LLMConfig, VisionConfig
from lance_deploy.model.lance import LanceLM
from lance_deploy.pipeline.tasks import TaskSpec
from lance_deploy.pipeline.tokenizer import LanceTokenizer


@dataclass
class Components:
    """What one task runs on."""

    cfg: LLMConfig
    tokenizer: LanceTokenizer
    lm: LanceLM
    vit: object | None  # QwenViT
    vae: object | None  # WanVAE
    layout: ReleaseLayout | None  # None for a quantized artifact
    variant: str = "image"


def load_lm(layout: ReleaseLayout, cfg: LLMConfig, spec: TaskSpec, dtype, device) -> LanceLM:
    """The MoT backbone with only the experts and heads the task uses."""
    with layout.open_weights() as reader:
        # the whole release key set is checked from the header first, so a damaged or foreign
        # file fails before any tensor is read, naming its first offending keys
        expected = expected_lance_shapes(cfg, layout.variant, latent_rows=layout.latent_rows)
        check_keys(reader, expected, str(layout.weights_file))
        return load_new(lambda: LanceLM(cfg, with_gen=spec.gen, with_lm_head=spec.lm_head), reader, dtype=dtype,
                        device=device)


def load_vit(layout: ReleaseLayout, vcfg: VisionConfig, dtype, device):
    """The bundled ViT of the Video checkpoint wins over the standalone one, as upstream loads it last."""
    from lance_deploy.model.vit import QwenViT

    source = layout.require_vit()
    with SafetensorsReader(source.file) as reader:
        return load_new(lambda: QwenViT(vcfg), reader, dtype=dtype, device=device, prefix=source.prefix)


def load_vae_parts(layout: ReleaseLayout, spec: TaskSpec, dtype, device):
    from lance_deploy.model.vae import load_vae

    parts = tuple(p for p, used in (("encoder", spec.vae_encoder), ("decoder", spec.vae_decoder)) if used)
    return load_vae(layout.require_vae(), dtype=dtype, device=device, parts=parts)


def load_components(layout: ReleaseLayout, spec: TaskSpec, *, dtype: torch.dtype, device) -> Components:
    """Load the tokenizer, config and the task's modules from a release layout."""
    cfg = LLMConfig.from_file(layout.config_file)
    tokenizer = LanceTokenizer.from_dir(layout.tokenizer_dir)
    lm = load_lm(layout, cfg, spec, dtype, device)
    vit = load_vit(layout, layout.vision_config(cfg), dtype, device) if spec.vit else None
    vae = load_vae_parts(layout, spec, dtype, device) if (spec.vae_encoder or spec.vae_decoder) else None
    return Components(cfg=cfg, tokenizer=tokenizer, lm=lm, vit=vit, vae=vae, layout=layout, variant=layout.variant)


def load_artifact_components(path, spec: TaskSpec, *, dtype: torch.dtype, device, verify: bool = True) -> Components:
    """The same components from a quantized artifact folder (checksums verified first)."""
    from pathlib import Path

    from lance_deploy.artifact.load import load_artifact_lm, load_artifact_vae, load_artifact_vit
    from lance_deploy.artifact.reader import ArtifactReader

    path = Path(path)
    reader = ArtifactReader(path)
    if verify:
        reader.verify()
    cfg = reader.config()
    tokenizer = artifact_tokenizer(reader)
    lm = load_artifact_lm(reader, cfg, with_gen=spec.gen, with_lm_head=spec.lm_head, dtype=dtype, device=device)
    vit = load_artifact_vit(reader, cfg, dtype, device) if spec.vit else None
    parts = tuple(p for p, used in (("encoder", spec.vae_encoder), ("decoder", spec.vae_decoder)) if used)
    vae = load_artifact_vae(reader, parts, dtype, device) if parts else None
    variant = reader.manifest.source.get("variant", "image")
    return Components(cfg=cfg, tokenizer=tokenizer, lm=lm, vit=vit, vae=vae, layout=None, variant=variant)


def artifact_tokenizer(reader) -> LanceTokenizer:
    """An artifact's tokenizer from the files its manifest lists, each hash-checked first, so
    nothing outside the artifact (the source model folder included) is read."""
    if "tokenizer.json" in reader.manifest.files:
        return LanceTokenizer.from_json(reader.read_file("tokenizer.json"), reader.path / "tokenizer.json")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if name in reader.manifest.files:
            reader.read_file(name)  # the hash check; the tokenizers library then reads the same file
    return LanceTokenizer.from_dir(reader.path)
