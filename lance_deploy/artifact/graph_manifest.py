"""`manifest.json` of an export folder: what each graph is, its shapes, files and verification.

Layout of the folder::

    manifest.json
    graphs/<graph>.onnx         # one per layer index / VAE chunk role / ViT
    graphs/<graph>.onnx.data    # its weights (ONNX external data)
    engines/<gpu>-sm<XY>/<graph>.plan + .json   # built later, on the target GPU

Every path in the manifest is relative to the folder and must stay inside it; `load_manifest`
rejects absolute paths and `..` components before anything is opened.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from lance_deploy.artifact.manifest import HEX64, MAX_MANIFEST_BYTES
from lance_deploy.core import jsonio
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.fsutil import atomic_path
from lance_deploy.core.schema import expect, expect_ints, fail, show

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_GRAPH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_AXIS = re.compile(r"[^\x00-\x1f]{1,200}")  # a dynamic axis: any printable name the exporter chose
_DTYPE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass
class TensorSpec:
    """One graph input or output. `shape` holds ints (static) or axis names (dynamic)."""

    name: str
    dtype: str  # numpy-style name: float32, bool, ...
    shape: list

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass
class GraphEntry:
    """One exported ONNX graph (the manifest's `parts` list holds one entry per graph).

    `profiles` maps each dynamic axis name to [min, opt, max] (TensorRT optimisation profile);
    `meta` carries part-specific facts (layer index, ViT grid, VAE tile / chunk role / slots).
    """

    name: str
    part: str
    preset: str
    file: str
    external_data: list[str]
    sha256: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profiles: dict[str, list[int]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    verification: dict | None = None

    def files(self) -> list[str]:
        return [self.file, *self.external_data]

    @classmethod
    def from_dict(cls, d: Any, where: str = "parts[0]") -> "GraphEntry":
        """Strict: exactly the fields `save_graph` writes, typed; SchemaError names the field."""
        d = _exact(cls, d, where)
        for k in ("name", "part", "preset", "file"):
            expect(d[k], (str,), f"{where}.{k}", "a string")
        if not _GRAPH_NAME.fullmatch(d["name"]):
            raise fail(f"{where}.name", f"{show(d['name'])} is not a graph name (letters, digits, '.', '-', '_')")
        d["external_data"] = list(expect(d["external_data"], (list,), f"{where}.external_data", "a list of paths"))
        files = [d["file"], *d["external_data"]]
        for i, rel in enumerate(files):
            if not isinstance(rel, str) or not _plain_relative(rel):
                at = f"{where}.{'file' if i == 0 else f'external_data[{i - 1}]'}"
                raise fail(at, f"path {show(rel)} must be relative and stay inside the folder")
        if len(set(files)) != len(files):
            raise fail(f"{where}.external_data", "lists a file twice (or the graph file itself)")
        sha = expect(d["sha256"], (dict,), f"{where}.sha256", "an object mapping each file to its sha256")
        if set(sha) != set(files):
            raise fail(f"{where}.sha256", f"must hash exactly the graph's files {files}, got {sorted(sha)}")
        for rel, digest in sha.items():
            if not isinstance(digest, str) or not HEX64.fullmatch(digest):
                raise fail(f"{where}.sha256.{rel}", f"expected 64 lower-case hex digits, got {show(digest)}")
        for k in ("inputs", "outputs"):
            specs = expect(d[k], (list,), f"{where}.{k}", "a list of tensor specs")
            d[k] = [_tensor_spec(t, f"{where}.{k}[{i}]") for i, t in enumerate(specs)]
        profiles = expect(d["profiles"], (dict,), f"{where}.profiles", "an object: axis -> [min, opt, max]")
        for axis, mom in profiles.items():
            lo, opt, hi = expect_ints(mom, f"{where}.profiles.{axis}", 0, 1 << 31, length=3)
            if not lo <= opt <= hi:
                raise fail(f"{where}.profiles.{axis}", f"expected min <= opt <= max, got {list(mom)}")
        expect(d["meta"], (dict,), f"{where}.meta", "an object")
        if d["verification"] is not None:
            expect(d["verification"], (dict,), f"{where}.verification", "an object or null")
        return cls(**d)


@dataclass
class Manifest:
    """The whole export: producer, source checkpoint, request and graph entries."""

    producer: dict
    source: dict
    request: dict  # parts, preset, aspect, exporter, opset: what identifies "the same export"
    parts: list[GraphEntry]
    schema_version: int = SCHEMA_VERSION

    def entries(self, part: str | None = None) -> list[GraphEntry]:
        return [e for e in self.parts if part is None or e.part == part]

    def entry(self, name: str) -> GraphEntry:
        for e in self.parts:
            if e.name == name:
                return e
        raise KeyError(name)

    def identity(self) -> str:
        """Hash of what was exported from what; equal identities mean "the same export"."""
        return export_identity(self.source, self.request)

    def to_dict(self) -> dict:
        return asdict(self)


def export_identity(source: dict, request: dict) -> str:
    """sha256 over the source fingerprint and the export request (not over results)."""
    key = json.dumps({"source": source, "request": request}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _plain_relative(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and "\\" not in rel and ":" not in p.parts[0] \
        and not any(part in ("..", "") for part in p.parts)


def safe_relative(root: Path, rel: str, what: str) -> Path:
    """Resolve `rel` inside `root`; refuse absolute paths, `..` and anything escaping `root`."""
    if not _plain_relative(rel):
        raise LanceUsageError(f"{root / MANIFEST}: {what} path {rel!r} must be relative and stay inside the folder")
    resolved = (root / PurePosixPath(rel)).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise LanceUsageError(f"{root / MANIFEST}: {what} path {rel!r} leaves the folder")
    return resolved




def _exact(cls, d: Any, where: str) -> dict:
    """``d`` as a dict holding exactly the fields of dataclass ``cls`` (what `asdict` writes)."""
    names = [f.name for f in fields(cls)]
    if not isinstance(d, dict):
        raise fail(where, f"expected an object with {', '.join(names)}, got {type(d).__name__}")
    extra, missing = [k for k in d if k not in names], [k for k in names if k not in d]
    if extra or missing:
        what = f"unknown field {show(extra[0])}" if extra else f"missing field {missing[0]!r}"
        raise fail(where, f"{what}; fields: {', '.join(names)}")
    return dict(d)


def _tensor_spec(d: Any, where: str) -> TensorSpec:
    d = _exact(TensorSpec, d, where)
    expect(d["name"], (str,), f"{where}.name", "a string")
    if not isinstance(d["dtype"], str) or not _DTYPE.fullmatch(d["dtype"]):
        raise fail(f"{where}.dtype", f"expected a numpy dtype name such as 'float32', got {show(d['dtype'])}")
    shape = expect(d["shape"], (list,), f"{where}.shape", "a list of sizes and axis names")
    for i, dim in enumerate(shape):
        ok = (type(dim) is int and 0 <= dim < 1 << 31) or (isinstance(dim, str) and _AXIS.fullmatch(dim))
        if not ok:
            raise fail(f"{where}.shape[{i}]", f"expected a size >= 0 or an axis name, got {show(dim)}")
    return TensorSpec(**d)


def parse_manifest(data: Any, where: str) -> Manifest:
    """The strict inverse of `Manifest.to_dict` (see `GraphEntry.from_dict`); SchemaError otherwise."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if type(version) is not int or version != SCHEMA_VERSION:
        raise fail(where, f"schema_version {show(version)} is not supported (expected {SCHEMA_VERSION})")
    d = _exact(Manifest, data, where)
    for k in ("producer", "source", "request"):
        expect(d[k], (dict,), f"{where}: {k}", "an object")
    parts = expect(d["parts"], (list,), f"{where}: parts", "a list of graph entries")
    d["parts"] = [GraphEntry.from_dict(e, f"{where}: parts[{i}]") for i, e in enumerate(parts)]
    first: dict[str, int] = {}
    for i, e in enumerate(d["parts"]):
        if e.name in first:
            raise fail(f"{where}: parts[{i}].name", f"parts[{first[e.name]}] already names graph {e.name!r}")
        first[e.name] = i
    owners = [f for e in d["parts"] for f in e.files()]
    if len(set(owners)) != len(owners):
        raise fail(f"{where}: parts", "two graphs claim the same file")
    return Manifest(**d)


def load_manifest(root: str | Path) -> Manifest:
    """Read and validate `root/manifest.json`: bounded JSON, strict schema, paths inside `root`."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise LanceUsageError(f"{path}: not found (is {root} an export folder from `lance-deploy export onnx`?)")
    data = jsonio.loads(path.read_bytes(), str(path), max_bytes=MAX_MANIFEST_BYTES, error=LanceUsageError)
    manifest = parse_manifest(data, str(path))
    for entry in manifest.parts:
        for rel in entry.files():
            safe_relative(root, rel, f"graph {entry.name}")
    return manifest


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Atomically (re)write `root/manifest.json`."""
    path = Path(root) / MANIFEST
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path
