"""``manifest.json`` of a quantized artifact (``exported/<name>/``): the contract with the runtime.

Everything the loader needs is written here, never inferred from file names or byte counts:
each tensor's canonical and release name, format spec, logical shape, shard, and per field the
safetensors key, dtype, shape, absolute byte offset and size, plus a sha256 over its bytes.
Groups (expert x layer range) name the shard the runtime pages with one read.

Layout of the folder::

    manifest.json
    weights/shared.safetensors  weights/und-000-011.safetensors ... weights/gen-024-035.safetensors
    weights/vit.safetensors  weights/vae.safetensors
    llm_config.json  generation_config.json  tokenizer files     (copied from the source model)

(``export/manifest.py`` is the ONNX export folder's manifest, a different file format.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from lance_deploy.core.errors import LanceUsageError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRODUCER = "lance-deploy"


class ArtifactError(LanceUsageError):
    """An artifact folder that is missing, unsealed, unsafe or corrupt; the message names the file."""


def check_relpath(rel: Any, where: str) -> str:
    """``rel`` if it is a normalised relative POSIX path with no '..'; else ArtifactError."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{where}: expected a relative path, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise ArtifactError(f"{where}: path {rel!r} is absolute; manifest paths must be relative to the artifact")
    if any(part in ("..", ".", "") for part in rel.split("/")):
        raise ArtifactError(f"{where}: path {rel!r} is not normalised or leaves the artifact folder ('..')")
    return rel


def _strict(cls, d: Any, where: str) -> dict:
    if not isinstance(d, Mapping):
        raise ArtifactError(f"{where}: expected an object, got {type(d).__name__}")
    fs = dataclasses.fields(cls)
    allowed = [f.name for f in fs]
    missing = [f.name for f in fs if f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    extra = [k for k in d if k not in allowed]
    if extra:
        raise ArtifactError(f"{where}: unknown field {extra[0]!r}; allowed: {', '.join(allowed)}")
    if missing:
        raise ArtifactError(f"{where}: missing field {missing[0]!r}")
    return dict(d)


@dataclass(frozen=True)
class FieldRecord:
    """One stored field of a tensor: safetensors ``key`` in the shard, dtype tag ('U8', 'F32',
    'F8_E4M3', 'BF16', ...), shape, absolute byte ``offset`` in the shard file and ``nbytes``."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
                "nbytes": self.nbytes}


@dataclass(frozen=True)
class TensorRecord:
    """One tensor. ``spec`` is a ``FormatSpec.to_dict()`` for packed weights (fields qdata, scale,
    zero_point, smooth) and None for plain tensors (one field, 'tensor')."""

    name: str
    release_name: str
    group: str
    shard: str
    format: str
    spec: dict[str, Any] | None
    shape: tuple[int, ...]
    fields: dict[str, FieldRecord]
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "release_name": self.release_name, "group": self.group, "shard": self.shard,
                "format": self.format, "spec": self.spec, "shape": list(self.shape),
                "fields": {k: f.to_dict() for k, f in self.fields.items()}, "sha256": self.sha256}

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.fields.values())


@dataclass(frozen=True)
class GroupRecord:
    """A paging unit: one shard holding one expert's layer range (or 'shared', 'vit', 'vae').
    ``data_offset``/``nbytes`` span all its tensor bytes, so one positioned read loads it."""

    name: str
    expert: str | None
    layers: tuple[int, int] | None
    shard: str
    data_offset: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "expert": self.expert, "layers": None if self.layers is None else list(self.layers),
                "shard": self.shard, "data_offset": self.data_offset, "nbytes": self.nbytes}


@dataclass
class ArtifactManifest:
    """The whole manifest; ``to_json``/``from_json`` round-trip exactly."""

    producer: dict[str, Any]
    source: dict[str, Any]
    recipe: dict[str, Any]
    tensors: list[TensorRecord]
    groups: list[GroupRecord]
    files: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "producer": self.producer, "source": self.source,
                "recipe": self.recipe, "created": self.created, "files": dict(self.files),
                "groups": [g.to_dict() for g in self.groups], "tensors": [t.to_dict() for t in self.tensors],
                "calibration": self.calibration, "quality": self.quality}

    def to_json(self) -> str:
        """Indented JSON with one line per group and per tensor (greppable, ~1 MB for the release)."""
        parts = []
        for k, v in self.to_dict().items():
            if k in ("groups", "tensors"):
                body = ",\n".join("  " + json.dumps(x) for x in v)
                parts.append(f" {json.dumps(k)}: [\n{body}\n ]" if v else f" {json.dumps(k)}: []")
            else:
                parts.append(f" {json.dumps(k)}: " + json.dumps(v, indent=1).replace("\n", "\n "))
        return "{\n" + ",\n".join(parts) + "\n}\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> ArtifactManifest:
        """Strict parse: schema version first (a newer artifact is refused, not misread), unknown
        fields rejected, every path checked to be relative and normalised."""
        if not isinstance(d, Mapping):
            raise ArtifactError(f"{where}: expected a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{where}: schema_version {version!r} not supported; this lance-deploy reads "
                                f"{SCHEMA_VERSION} (upgrade lance-deploy, or re-quantize)")
        d = _strict(cls, d, where)
        d["groups"] = [_group(g, f"{where}: groups[{i}]") for i, g in enumerate(d["groups"])]
        d["tensors"] = [_tensor(t, f"{where}: tensors[{i}]") for i, t in enumerate(d["tensors"])]
        for role, rel in d.get("files", {}).items():
            check_relpath(rel, f"{where}: files.{role}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> ArtifactManifest:
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{where}: not valid JSON ({e})") from None


def _group(d: Any, where: str) -> GroupRecord:
    d = _strict(GroupRecord, d, where)
    check_relpath(d["shard"], f"{where}.shard")
    d["layers"] = None if d["layers"] is None else tuple(d["layers"])
    return GroupRecord(**d)


def _tensor(d: Any, where: str) -> TensorRecord:
    d = _strict(TensorRecord, d, where)
    check_relpath(d["shard"], f"{where}.shard")
    d["shape"] = tuple(d["shape"])
    fields = {}
    for k, f in dict(d["fields"]).items():
        f = _strict(FieldRecord, f, f"{where}.fields.{k}")
        fields[k] = FieldRecord(**{**f, "shape": tuple(f["shape"])})
    d["fields"] = fields
    return TensorRecord(**d)
