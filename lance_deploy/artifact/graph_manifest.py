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
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.fsutil import atomic_path

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


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
    def from_dict(cls, d: dict) -> "GraphEntry":
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
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


def safe_relative(root: Path, rel: str, what: str) -> Path:
    """Resolve `rel` inside `root`; refuse absolute paths, `..` and anything escaping `root`."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or "\\" in rel or any(part in ("..", "") for part in p.parts) or ":" in p.parts[0]:
        raise LanceUsageError(f"{root / MANIFEST}: {what} path {rel!r} must be relative and stay inside the folder")
    resolved = (root / p).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise LanceUsageError(f"{root / MANIFEST}: {what} path {rel!r} leaves the folder")
    return resolved




def load_manifest(root: str | Path) -> Manifest:
    """Read and validate `root/manifest.json` (schema, required keys, paths)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise LanceUsageError(f"{path}: not found (is {root} an export folder from `lance-deploy export onnx`?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LanceUsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version") if isinstance(data, dict) else None
        raise LanceUsageError(f"{path}: schema_version {found!r} is not supported (expected {SCHEMA_VERSION})")
    try:
        manifest = Manifest(producer=data["producer"], source=data["source"], request=data["request"],
                            parts=[GraphEntry.from_dict(e) for e in data["parts"]])
    except (KeyError, TypeError) as e:
        raise LanceUsageError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
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
