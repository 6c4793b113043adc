"""``manifest.json`` of a quantized artifact (``exported/<name>/``): the contract with the runtime.

Everything the loader needs is written here, never inferred from file names or byte counts:
each tensor's canonical and release name, format spec, logical shape, shard, and per field the
safetensors key, dtype, shape, absolute byte offset and size, plus a sha256 over its bytes.
Groups (expert x layer range) name a shard span that ``ArtifactReader.read_group`` loads with one
positioned read (the pager pages from host copies, not from shards); ``files`` maps each
copied file (llm_config.json, tokenizer files) to its sha256. ``from_json`` accepts nothing the
writer would not write (record rules between records: ``manifest_rules.py``).

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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from lance_deploy.artifact.manifest_rules import PLAIN_FIELD, check_records
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.safetensors_io import itemsize
from lance_deploy.core import jsonio
from lance_deploy.core.errors import CheckpointError, LanceUsageError
from lance_deploy.core.schema import (
    SchemaError,
    expect,
    expect_int,
    expect_ints,
    fail,
    one_of,
    show,
)
from lance_deploy.formats import TENSOR_FIELDS

SCHEMA_VERSION = 2
"""2: ``files`` maps each copied file to its sha256 (1 mapped it to itself)."""
MANIFEST_NAME = "manifest.json"
PRODUCER = "lance-deploy"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # the release's is ~1 MB
FIELD_ORDER = TENSOR_FIELDS + (PLAIN_FIELD,)
SHARD_DIR = "weights"
GROUP_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_DIM = 1 << 31
EXPERTS = (None, "und", "gen")


def shard_path(group: str) -> str:
    """Where a group's shard lives; the only place a shard may be."""
    return f"{SHARD_DIR}/{group}.safetensors"


def field_key(name: str, fld: str) -> str:
    """The safetensors key of one stored field: the tensor's name, or ``name.field`` when packed."""
    return name if fld == PLAIN_FIELD else f"{name}.{fld}"


class ArtifactError(LanceUsageError):
    """An artifact folder that is missing, unsealed, unsafe or corrupt; the message names the file."""


def check_relpath(rel: Any, where: str) -> str:
    """``rel`` if it is a normalised relative POSIX path with no '..'; else ArtifactError."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{where}: expected a relative path, got {show(rel)}")
    p = PurePosixPath(rel)
    if p.is_absolute() or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise ArtifactError(f"{where}: path {show(rel)} is absolute; manifest paths must be relative to the artifact")
    if any(part in ("..", ".", "") for part in rel.split("/")):
        raise ArtifactError(f"{where}: path {show(rel)} is not normalised or leaves the artifact folder ('..')")
    return rel


def _strict(cls, d: Any, where: str, optional: tuple[str, ...] = ()) -> dict:
    """``d`` as a dict with exactly the fields of ``cls``: what the writer writes, nothing else
    (``optional`` fields are written only when set)."""
    if not isinstance(d, Mapping):
        raise fail(where, f"expected an object, got {type(d).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    extra = [k for k in d if k not in allowed]
    if extra:
        raise fail(where, f"unknown field {show(extra[0])}; allowed: {', '.join(allowed)}")
    missing = [k for k in allowed if k not in d and k not in optional]
    if missing:
        raise fail(where, f"missing field {missing[0]!r}")
    return dict(d)


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)) and len(v) > 8:
        raise fail(where, f"expected at most 8 dimensions, got {len(v)}")
    return expect_ints(v, where, 0, MAX_DIM)


def _str(v: Any, where: str) -> str:
    return expect(v, (str,), where, "a string")


def _hex(v: Any, where: str) -> str:
    if not isinstance(v, str) or not HEX64.fullmatch(v):
        raise fail(where, f"expected a sha256 (64 lower-case hex digits), got {show(v)}")
    return v


def _object(v: Any, where: str) -> dict:
    return dict(expect(v, (dict,), where, "an object"))


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
    zero_point, smooth) and None for plain tensors (one field, 'tensor'). ``activation_amax``: a
    W8A8 weight's calibrated per-tensor input amax, the static Q/DQ scale of ``export --target
    tensorrt`` (written only when recorded; artifacts from before it simply lack it)."""

    name: str
    release_name: str
    group: str
    shard: str
    format: str
    spec: dict[str, Any] | None
    shape: tuple[int, ...]
    fields: dict[str, FieldRecord]
    sha256: str
    activation_amax: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "release_name": self.release_name, "group": self.group, "shard": self.shard,
             "format": self.format, "spec": self.spec, "shape": list(self.shape),
             "fields": {k: f.to_dict() for k, f in self.fields.items()}, "sha256": self.sha256}
        if self.activation_amax is not None:
            d["activation_amax"] = self.activation_amax
        return d

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
        """Strict parse: schema version first (a newer artifact is refused, not misread), then
        exactly the fields and value types the writer writes, every path a plain relative name
        inside the folder, and records that agree with each other and with their formats."""
        if not isinstance(d, Mapping):
            raise ArtifactError(f"{where}: expected a JSON object")
        version = d.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise ArtifactError(f"{where}: schema_version {show(version)} not supported; this lance-deploy reads "
                                f"{SCHEMA_VERSION} (upgrade lance-deploy, or re-quantize)")
        try:
            d = _strict(cls, d, where)
            d["producer"] = _producer(d["producer"], f"{where}: producer")
            for k in ("source", "recipe", "calibration", "quality"):
                d[k] = _object(d[k], f"{where}: {k}")
            if "variant" in d["source"]:
                one_of(d["source"]["variant"], ("image", "video"), f"{where}: source.variant")
            _str(d["created"], f"{where}: created")
            d["files"] = _files(d["files"], f"{where}: files")
            d["groups"] = [_group(g, f"{where}: groups[{i}]")
                           for i, g in enumerate(expect(d["groups"], (list,), f"{where}: groups", "a list"))]
            d["tensors"] = [_tensor(t, f"{where}: tensors[{i}]")
                            for i, t in enumerate(expect(d["tensors"], (list,), f"{where}: tensors", "a list"))]
            manifest = cls(**d)
            check_records(manifest, where)
        except SchemaError as e:
            raise ArtifactError(str(e)) from None
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_NAME) -> ArtifactManifest:
        data = jsonio.loads(text, where, max_bytes=MAX_MANIFEST_BYTES, error=ArtifactError)
        return cls.from_dict(data, where)


def _producer(d: Any, where: str) -> dict[str, str]:
    if not isinstance(d, Mapping) or set(d) != {"name", "version"}:
        raise fail(where, f"expected {{\"name\": \"{PRODUCER}\", \"version\": ...}}, got {show(d)}")
    one_of(d["name"], (PRODUCER,), f"{where}.name")
    return {"name": PRODUCER, "version": _str(d["version"], f"{where}.version")}


def _files(d: Any, where: str) -> dict[str, str]:
    """Copied file -> sha256. A name never points at the manifest or into the shard folder."""
    d = expect(d, (dict,), where, "an object mapping each copied file to its sha256")
    for rel, digest in d.items():
        check_relpath(rel, f"{where}.{rel}")
        if rel == MANIFEST_NAME or rel.split("/")[0] == SHARD_DIR:
            raise fail(f"{where}.{rel}", f"a copied file cannot be {MANIFEST_NAME} or live in {SHARD_DIR}/")
        _hex(digest, f"{where}.{rel}")
    return dict(d)


def _group(d: Any, where: str) -> GroupRecord:
    d = _strict(GroupRecord, d, where)
    name = _str(d["name"], f"{where}.name")
    if not GROUP_NAME.fullmatch(name):
        raise fail(f"{where}.name", f"{show(name)} is not a group name (lower-case letters, digits and '-')")
    if d["shard"] != shard_path(name):
        raise fail(f"{where}.shard", f"expected {shard_path(name)!r}, got {show(d['shard'])}")
    one_of(d["expert"], EXPERTS, f"{where}.expert")
    if d["layers"] is not None:
        d["layers"] = expect_ints(d["layers"], f"{where}.layers", 0, 1 << 16, length=2)
        if d["layers"][0] > d["layers"][1]:
            raise fail(f"{where}.layers", f"first layer after last: {list(d['layers'])}")
    if (d["expert"] is None) != (d["layers"] is None):
        raise fail(where, "expert and layers are set together (an expert's layer range) or both null")
    expect_int(d["data_offset"], f"{where}.data_offset", 8)
    expect_int(d["nbytes"], f"{where}.nbytes", 0)
    return GroupRecord(**d)


def _field(name: str, fld: str, d: Any, where: str) -> FieldRecord:
    d = _strict(FieldRecord, d, where)
    if d["key"] != field_key(name, fld):
        raise fail(f"{where}.key", f"expected {field_key(name, fld)!r}, got {show(d['key'])}")
    tag = _str(d["dtype"], f"{where}.dtype")
    try:
        size = itemsize(tag)
    except CheckpointError:
        raise fail(f"{where}.dtype", f"{show(tag)} is not a safetensors dtype tag") from None
    d["shape"] = _shape(d["shape"], f"{where}.shape")
    expect_int(d["offset"], f"{where}.offset", 8)
    numel = 1
    for n in d["shape"]:
        numel *= n
    if expect_int(d["nbytes"], f"{where}.nbytes", 0) != numel * size:
        raise fail(f"{where}.nbytes", f"{tag}{list(d['shape'])} is {numel * size} bytes, got {d['nbytes']}")
    return FieldRecord(**d)


def _tensor(d: Any, where: str) -> TensorRecord:
    d = _strict(TensorRecord, d, where, optional=("activation_amax",))
    name = _str(d["name"], f"{where}.name")
    try:
        release = cn.to_release(name)
        normal = cn.to_canonical(release) == name and name not in cn.IGNORED
    except CheckpointError:
        normal = False
    if not normal:
        raise fail(f"{where}.name", f"{show(name)} is not a canonical tensor name the artifact stores")
    if d["release_name"] != release:
        raise fail(f"{where}.release_name", f"expected {release!r}, got {show(d['release_name'])}")
    for k in ("group", "shard", "format"):
        _str(d[k], f"{where}.{k}")
    if d["spec"] is not None:
        _object(d["spec"], f"{where}.spec")
    d["shape"] = _shape(d["shape"], f"{where}.shape")
    flds = expect(d["fields"], (dict,), f"{where}.fields", "an object of stored fields")
    for k in flds:
        one_of(k, FIELD_ORDER, f"{where}.fields.{k}")
    d["fields"] = {k: _field(name, k, f, f"{where}.fields.{k}") for k, f in flds.items()}
    _hex(d["sha256"], f"{where}.sha256")
    if "activation_amax" in d:
        amax = d["activation_amax"]
        if type(amax) not in (int, float) or not 0 <= amax < float("inf"):
            raise fail(f"{where}.activation_amax", f"expected a finite amax >= 0, got {show(amax)}")
        if not (d["spec"] or {}).get("activations"):
            raise fail(f"{where}.activation_amax", "only a W8A8 weight (spec.activations set) records one")
        d["activation_amax"] = float(amax)
    return TensorRecord(**d)
