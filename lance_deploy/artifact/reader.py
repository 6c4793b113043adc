"""Open, check and read a sealed artifact folder.

Opening parses ``manifest.json`` strictly and refuses, before any shard is touched, a manifest
from a newer schema, an unsealed ``*.partial`` folder, any symlink in the folder, any path that
is absolute or holds ``..``, and tensor records that its own llm_config.json contradicts. Shard
reads are positioned reads at the offsets the manifest records; copied files are read whole
through ``read_file``, hash-checked; ``verify`` checks every tensor's sha256 and the shard
headers. Imports formats and the manifest only, never calibration or algorithm code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from lance_deploy import formats
from lance_deploy.artifact.folder import open_inside, read_inside, refuse_symlinks
from lance_deploy.artifact.key_table import check_key_table
from lance_deploy.artifact.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ArtifactError,
    ArtifactManifest,
    FieldRecord,
    TensorRecord,
)
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader, torch_dtype
from lance_deploy.config import LLMConfig, parse_json
from lance_deploy.core.errors import CheckpointError
from lance_deploy.formats import FormatSpec, PackedTensor

_CHUNK = 256 * 1024 * 1024
CONFIG_FILE = "llm_config.json"
MAX_FILE_BYTES = 256 * 1024 * 1024  # a copied file (tokenizer.json is ~7 MB)


def field_bytes(t: torch.Tensor):
    """The raw little-endian bytes of a tensor (what the shard stores), as a numpy uint8 view."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _pread(fd: int, offset: int, nbytes: int, path: Path) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view, pos = memoryview(buf.numpy()).cast("B"), 0
    while pos < nbytes:
        got = os.preadv(fd, [view[pos:pos + min(_CHUNK, nbytes - pos)]], offset + pos)
        if got <= 0:
            raise ArtifactError(f"{path}: truncated shard (read stopped at byte {offset + pos})")
        pos += got
    return buf


class ArtifactReader:
    """A sealed artifact: ``manifest``, ``verify()``, ``read(name)``, ``read_group(group)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fds: dict[str, int] = {}
        self._cfg: LLMConfig | None = None
        if self.path.name.endswith(".partial"):
            raise ArtifactError(f"{self.path}: an unsealed (partial) artifact; the run that wrote it did not finish")
        mpath = self.path / MANIFEST_NAME
        if not os.path.lexists(mpath):
            raise ArtifactError(f"{self.path}: not a sealed artifact (no {MANIFEST_NAME})")
        self._root = self.path.resolve()
        refuse_symlinks(self._root)
        raw = read_inside(self._root, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        self.manifest = ArtifactManifest.from_json(raw, str(mpath))
        self._check_paths(mpath)
        self._tensors = {t.name: t for t in self.manifest.tensors}
        self._groups = {g.name: g for g in self.manifest.groups}
        if CONFIG_FILE in self.manifest.files:  # without it the artifact cannot run; the loader says so
            check_key_table(self.manifest, self.config(), str(mpath))

    def read_file(self, rel: str) -> bytes:
        """A copied file (llm_config.json, tokenizer.json, ...) read through the manifest's
        ``files``, its sha256 checked: nothing else in or outside the folder is ever opened."""
        digest = self.manifest.files.get(rel)
        if digest is None:
            raise ArtifactError(f"{self.path / MANIFEST_NAME}: files lists no {rel!r}; this artifact cannot "
                                f"provide it (re-quantize from a model folder that has it)")
        data = read_inside(self._root, rel, MAX_FILE_BYTES)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"{self.path / rel}: fails its sha256 check against {MANIFEST_NAME}; the file "
                                "was modified after the artifact was sealed")
        return data

    def config(self) -> LLMConfig:
        """The artifact's ``llm_config.json`` (hash-checked, parsed once)."""
        if self._cfg is None:
            self._cfg = LLMConfig.from_json(parse_json(self.read_file(CONFIG_FILE), str(self.path / CONFIG_FILE)),
                                            str(self.path / CONFIG_FILE))
        return self._cfg

    def _check_paths(self, mpath: Path) -> None:
        refs = [(f"tensors[{i}].shard", t.shard) for i, t in enumerate(self.manifest.tensors)]
        refs += [(f"groups[{i}].shard", g.shard) for i, g in enumerate(self.manifest.groups)]
        refs += [(f"files.{k}", k) for k in self.manifest.files]
        for where, rel in refs:
            real = (self._root / rel).resolve()
            if not real.is_relative_to(self._root):
                raise ArtifactError(f"{mpath}: {where} {rel!r} resolves outside the artifact folder (symlink)")
            if not real.is_file():
                raise ArtifactError(f"{mpath}: {where} {rel!r} does not exist in the artifact")

    def names(self) -> list[str]:
        """Canonical tensor names, in manifest order."""
        return list(self._tensors)

    def group_names(self) -> list[str]:
        return list(self._groups)

    def record(self, name: str) -> TensorRecord:
        try:
            return self._tensors[name]
        except KeyError:
            raise ArtifactError(f"{self.path}: no tensor {name!r} in the manifest") from None

    def _fd(self, rel: str) -> int:
        if rel not in self._fds:
            self._fds[rel] = open_inside(self._root, rel)
        return self._fds[rel]

    @staticmethod
    def _field(f: FieldRecord, raw: torch.Tensor) -> torch.Tensor:
        dtype = torch_dtype(f.dtype)
        if raw.storage_offset() % dtype.itemsize:  # safetensors does not align entries; view needs it
            raw = raw.clone()
        return raw.view(dtype).reshape(f.shape)

    def _assemble(self, rec: TensorRecord, tensors: dict[str, torch.Tensor], device) -> PackedTensor | torch.Tensor:
        if rec.spec is None:
            return tensors["tensor"].to(device)
        spec = FormatSpec.from_dict(rec.spec)
        p = PackedTensor.from_tensors(rec.name, {f"{rec.name}.{k}": v for k, v in tensors.items()}, spec, rec.shape)
        return formats.validate(p, rec.name).to(device)

    def read(self, name: str, device: str | torch.device = "cpu") -> PackedTensor | torch.Tensor:
        """One tensor: a PackedTensor for packed weights, else the plain tensor."""
        rec = self.record(name)
        fd, path = self._fd(rec.shard), self._root / rec.shard
        tensors = {k: self._field(f, _pread(fd, f.offset, f.nbytes, path)) for k, f in rec.fields.items()}
        return self._assemble(rec, tensors, device)

    def read_group(self, group: str, device: str | torch.device = "cpu") -> dict[str, PackedTensor | torch.Tensor]:
        """Every tensor of a group from ONE positioned read of its shard's data span."""
        g = self._groups.get(group)
        if g is None:
            raise ArtifactError(f"{self.path}: no group {group!r}; groups: {', '.join(self._groups)}")
        blob = _pread(self._fd(g.shard), g.data_offset, g.nbytes, self._root / g.shard)
        out = {}
        for rec in (t for t in self.manifest.tensors if t.group == group):
            tensors = {k: self._field(f, blob[f.offset - g.data_offset:][:f.nbytes])
                       for k, f in rec.fields.items()}
            out[rec.name] = self._assemble(rec, tensors, device)
        return out

    def verify(self) -> None:
        """Check each shard's header against the manifest and every tensor's sha256.

        Raises ArtifactError naming the shard and the tensor that fails."""
        headers: dict[str, dict] = {}
        for rec in self.manifest.tensors:
            path = self._root / rec.shard
            if rec.shard not in headers:
                try:
                    with SafetensorsReader(path) as r:
                        headers[rec.shard] = r.infos()
                except CheckpointError as e:
                    raise ArtifactError(f"{rec.shard}: unreadable shard ({e})") from None
            h = hashlib.sha256()
            for f in rec.fields.values():
                info = headers[rec.shard].get(f.key)
                header = None if info is None else (info.dtype, info.shape, info.offset, info.nbytes)
                if header != (f.dtype, f.shape, f.offset, f.nbytes):
                    raise ArtifactError(f"{rec.shard}: tensor {rec.name}: shard header entry {f.key!r} does not match "
                                        "the manifest (the shard was replaced or edited)")
                h.update(_pread(self._fd(rec.shard), f.offset, f.nbytes, path).numpy())
            if h.hexdigest() != rec.sha256:
                raise ArtifactError(f"{rec.shard}: tensor {rec.name} fails its sha256 check (manifest "
                                    f"{rec.sha256[:16]}..., file {h.hexdigest()[:16]}...); the shard is corrupt "
                                    "or was modified")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ArtifactReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()
