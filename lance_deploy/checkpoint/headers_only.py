"""A full-size release made of headers only: planning at release shapes in a few KB of disk.

The safetensors files declare every release tensor but their data regions are holes (sparse
files, never read); the VAE pickle stores one float per tensor through stride-0 views. The
memory planner reads headers, configs and the VAE index only, so `memory-plan` and the planner
benchmarks run on it anywhere; loading weights from it is not meaningful.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from lance_deploy.checkpoint.make_vae import vae_shapes
from lance_deploy.checkpoint.names import expected_lance_shapes, expected_vit_shapes
from lance_deploy.config import FULL_LLM

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def sparse_safetensors(path: Path, shapes: dict, tag: str, itemsize: int) -> None:
    """A safetensors file whose header declares `shapes` (dtype `tag`); the data is a hole."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = itemsize
        for d in shape:
            n *= d
        header[key] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def make_header_only_release(root: Path, tokenizer_dir: Path) -> Path:
    """Lance_3B / Lance_3B_Video (F32, as first released), the BF16 ViT and the VAE at release
    shapes under `root`; the tokenizer files are copied from `tokenizer_dir`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for variant, folder in (("image", "Lance_3B"), ("video", "Lance_3B_Video")):
        d = root / folder
        d.mkdir(exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / f, d / f)
        (d / "llm_config.json").write_text(json.dumps(FULL_LLM.to_dict()))
        sparse_safetensors(d / "model.safetensors", expected_lance_shapes(FULL_LLM, variant), "F32", 4)
    vit = root / "Qwen2.5-VL-ViT"
    vit.mkdir(exist_ok=True)
    (vit / "config.json").write_text(json.dumps(FULL_LLM.vision.to_dict()))
    sparse_safetensors(vit / "vit.safetensors", expected_vit_shapes(FULL_LLM.vision), "BF16", 2)
    one = torch.zeros(1)
    torch.save({k: one.expand(s) for k, s in vae_shapes(160, 256).items()}, root / "Wan2.2_VAE.pth")
    return root
