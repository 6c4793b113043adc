"""Load a quantized artifact (`exported/<name>/`) into the same modules the release loads into.

The manifest says how each tensor is stored; packed Linear weights become `QLinear`s, plain
tensors are streamed into the meta-built modules exactly as from a release checkpoint. Every
checksum is verified first, and the reader refuses any path outside the artifact folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lance_deploy.artifact.manifest import MANIFEST_NAME
from lance_deploy.artifact.reader import ArtifactReader
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.loader import load_into
from lance_deploy.checkpoint.vae_keys import check_vae_table
from lance_deploy.config import LLMConfig
from lance_deploy.formats import PackedTensor
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.model.lance import LanceLM
from lance_deploy.model.meta import build_on_meta


def is_artifact(path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


class _Plain(Mapping):
    """Release/module key -> plain tensor read from the artifact (what `load_into` consumes)."""

    def __init__(self, reader: ArtifactReader, to_canonical, keys):
        self.reader, self.to_canonical, self.keys_ = reader, to_canonical, list(keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.reader.read(self.to_canonical(key))
        if isinstance(value, PackedTensor):
            raise KeyError(key)
        return value

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def _install_qlinears(module: nn.Module, reader: ArtifactReader, to_canonical, device, dtype) -> set[str]:
    """Replace every Linear whose weight is stored packed; returns the state-dict names now covered."""
    covered = set()
    names = set(reader.names())
    for path, linear in list(module.named_modules()):
        if not isinstance(linear, nn.Linear):
            continue
        canonical = to_canonical(f"{path}.weight")
        if canonical not in names:
            continue
        packed = reader.read(canonical, device)
        if not isinstance(packed, PackedTensor):
            continue
        bias = reader.read(to_canonical(f"{path}.bias"), device).to(dtype) if linear.bias is not None else None
        parent_path, _, attr = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        q = QLinear(packed, bias)
        q.act_amax = reader.record(canonical).activation_amax  # static Q/DQ scales (export --target tensorrt)
        setattr(parent, attr, q)
        covered.update({f"{path}.weight", f"{path}.bias"})
    return covered


def load_module(module: nn.Module, reader: ArtifactReader, to_canonical, dtype, device) -> None:
    """Fill a meta-built module from the artifact: packed Linears become QLinears, the rest streams in."""
    covered = _install_qlinears(module, reader, to_canonical, device, dtype)
    rest = [k for k in module.state_dict() if k not in covered and not _is_qlinear_buffer(module, k)]
    load_into(module, _Plain(reader, to_canonical, rest), dtype=dtype, device=device,
              select=lambda k: k in set(rest))


def _is_qlinear_buffer(module: nn.Module, key: str) -> bool:
    owner = key.rpartition(".")[0]
    return isinstance(module.get_submodule(owner), QLinear) if owner else False


def load_artifact_lm(reader: ArtifactReader, cfg: LLMConfig, *, with_gen: bool, with_lm_head: bool, dtype,
                     device) -> LanceLM:
    return build_on_meta(lambda: LanceLM(cfg, with_gen=with_gen, with_lm_head=with_lm_head),
                         lambda lm: load_module(lm, reader, cn.to_canonical, dtype, device))


def load_artifact_vit(reader: ArtifactReader, cfg: LLMConfig, dtype, device):
    from lance_deploy.model.vit import QwenViT

    return build_on_meta(lambda: QwenViT(cfg.vision),
                         lambda vit: load_module(vit, reader, lambda k: "vit." + k, dtype, device))


def load_artifact_vae(reader: ArtifactReader, parts: tuple[str, ...], dtype, device):
    from lance_deploy.model.vae import WanVAE

    shapes = {n[4:]: tuple(reader.record(n).shape) for n in reader.names() if n.startswith("vae.")}
    # only the parts the task runs must be there: t2i needs no encoder
    enc_dim, dec_dim = check_vae_table(shapes, f"{reader.path}: the artifact's vae.* tensors", parts)
    keep = ("encoder.", "conv1.") if "encoder" in parts else ()
    keep += ("decoder.", "conv2.") if "decoder" in parts else ()

    def fill(vae: WanVAE) -> None:
        rest = [k for k in vae.state_dict() if k.startswith(keep)]
        load_into(vae, _Plain(reader, lambda k: "vae." + k, rest), dtype=dtype, device=device,
                  select=lambda k: k.startswith(keep))

    return build_on_meta(lambda: WanVAE(enc_dim=enc_dim, dec_dim=dec_dim), fill)
