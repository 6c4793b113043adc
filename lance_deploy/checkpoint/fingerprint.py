"""Checkpoint identity for job fingerprints and artifact manifests, without reading 25 GB.

Per file: its size, and a sha256 over (the safetensors header, if any) + three 1 MiB samples
(start, middle, end of the file). Small files (configs, tokenizer) are hashed whole. The header
pins every name, dtype, shape and offset; the samples catch re-exported or re-trained weights of
the same shapes; the tail of a ``.pth`` (a zip) is its central directory, which holds a CRC-32 of
every tensor record. Hashing every byte would cost one full read of the release per run, for a
check that the samples already make very unlikely to miss. Keys are roles ('weights', 'vit',
'vae', ...), not paths, so moving the checkpoint folder does not change the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMALL_FILE = 8 * 1024 * 1024
SAMPLE = 1024 * 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class SourceFingerprint:
    """``digest`` over ``files`` (role -> {size, sha256, method}) plus what the headers say."""

    digest: str
    variant: str
    stored_dtype: str
    files: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``source`` object and a job fingerprint part."""
        return {"fingerprint": self.digest, "variant": self.variant, "stored_dtype": self.stored_dtype,
                "files": self.files}


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """{size, sha256, method}: whole-file hash for small files, header + samples for large ones."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SMALL_FILE:
            h.update(f.read())
            return {"size": size, "sha256": h.hexdigest(), "method": "full"}
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if path.suffix == ".safetensors" and 0 < n <= size - 8:
            h.update(head + f.read(n))  # the whole header: names, dtypes, shapes, offsets
        for start in (0, size // 2 - SAMPLE // 2, size - SAMPLE):
            f.seek(max(start, 0))
            h.update(f.read(SAMPLE))
    return {"size": size, "sha256": h.hexdigest(), "method": "header+samples"}


def source_fingerprint(layout) -> SourceFingerprint:
    """Fingerprint of the files a ``ReleaseLayout`` uses: weights, config, tokenizer, ViT, VAE."""
    roles: dict[str, Path] = {"weights": layout.weights_file, "config": layout.config_file}
    for name in TOKENIZER_FILES:
        if (layout.tokenizer_dir / name).is_file():
            roles[name] = layout.tokenizer_dir / name
    if not layout.has_bundled_vit and layout.vit_file is not None:
        roles["vit"] = layout.vit_file
    if layout.vae_file is not None:
        roles["vae"] = layout.vae_file
    files = {role: file_fingerprint(p) for role, p in roles.items()}
    body = {"variant": layout.variant, "stored_dtype": layout.stored_dtype, "files": files}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return SourceFingerprint(digest, layout.variant, layout.stored_dtype, files)
