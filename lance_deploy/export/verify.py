"""`verify`: run every exported graph in onnxruntime against PyTorch and record the errors.

Errors per output: max-abs and relative L2 (||got - ref|| / ||ref||), the worst over the input
cases of that graph. They are written into each graph's `verification` in manifest.json (atomic
rewrite). An fp32 graph passes at rel <= 1e-4, the project's golden float32 criterion. A
``--target tensorrt`` export's W8A8 graphs are compared with the QLinears switched to the same
static activation scales, and every graph also gets the TensorRT lint (``trt_lint.py``):
recorded for any export, a failure only for a tensorrt one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lance_deploy.artifact.graph_manifest import GraphEntry, Manifest, load_manifest, safe_relative, write_manifest
from lance_deploy.core.errors import LanceError, LanceUsageError
from lance_deploy.core.fsutil import sha256_file
from lance_deploy.export.graph_file import onnx_modules
from lance_deploy.export.reference import CHECKS, Comparison
from lance_deploy.export.sources import Source, open_source
from lance_deploy.export.trt_lint import errors as lint_errors
from lance_deploy.export.trt_lint import lint_graph
from lance_deploy.runtime.graphs import providers, session_options

FP32_REL_TOL = 1e-4


@dataclass
class VerifyResult:
    """The verified manifest and the names of the graphs over tolerance."""

    manifest: Manifest
    failed: list[str]




def check_integrity(root: Path, manifest: Manifest) -> None:
    """Every graph and weight file must still hash to what the export recorded."""
    for entry in manifest.parts:
        for rel, digest in entry.sha256.items():
            path = safe_relative(root, rel, f"graph {entry.name}")
            if not path.is_file():
                raise LanceUsageError(f"{path}: missing (listed in {root / 'manifest.json'})")
            if sha256_file(path) != digest:
                raise LanceError(f"{path}: sha256 differs from manifest.json (file changed after export)")


class SessionPool:
    """One onnxruntime session per graph, created on first use."""

    def __init__(self, root: Path):
        self.root, self.sessions, self.used = root, {}, {}

    def _session(self, entry: GraphEntry):
        if entry.name not in self.sessions:
            _, ort = onnx_modules()
            path = str(safe_relative(self.root, entry.file, entry.name))
            session = ort.InferenceSession(path, session_options(), providers=[p for p, _ in providers()],
                                           provider_options=[o for _, o in providers()])
            self.sessions[entry.name], self.used[entry.name] = session, session.get_providers()[0]
        return self.sessions[entry.name]

    def run(self, entry: GraphEntry, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self._session(entry)
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
        names = [o.name for o in session.get_outputs()]
        return {n: torch.from_numpy(a) for n, a in zip(names, session.run(names, arrays))}


def _errors(c: Comparison) -> tuple[float, float]:
    got, ref = c.got.double(), c.expected.double()
    if got.shape != ref.shape:
        raise LanceError(f"graph {c.entry} output {c.output} has shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    diff = got - ref
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    rel = float(diff.norm() / ref.norm().clamp_min(1e-30)) if diff.numel() else 0.0
    return max_abs, rel


def _record(entry: GraphEntry, comps: list[Comparison], provider: str, ort_version: str) -> bool:
    outputs: dict[str, dict] = {}
    for c in comps:
        max_abs, rel = _errors(c)
        cur = outputs.setdefault(c.output, {"max_abs": 0.0, "rel_l2": 0.0})
        cur["max_abs"], cur["rel_l2"] = max(cur["max_abs"], max_abs), max(cur["rel_l2"], rel)
    passed = all(o["rel_l2"] <= FP32_REL_TOL for o in outputs.values())
    entry.verification = {"provider": provider, "onnxruntime": ort_version, "reference": "pytorch float32 cpu",
                          "cases": sorted({c.case for c in comps}), "outputs": outputs,
                          "tolerance_rel_l2": FP32_REL_TOL, "passed": passed}
    return passed


def _source_for(manifest: Manifest, model: Path | None, root: Path) -> Source:
    path = model or Path(manifest.source["model_dir"])
    source = open_source(path)
    if source.fingerprint()["files"] != manifest.source["files"]:
        raise LanceUsageError(f"{path}: the checkpoint differs from the one {root} was exported from; "
                              "pass --model with the original checkpoint")
    if hasattr(source, "static_activations"):  # an artifact: the reference uses the graphs' static scales
        source.static_activations = target_of(manifest) == "tensorrt"
    return source


def target_of(manifest: Manifest) -> str:
    """The export's --target (exports from before targets existed were onnxruntime graphs)."""
    return manifest.request.get("target", "onnxruntime")


def _lint(root: Path, entry: GraphEntry, enforced: bool) -> bool:
    findings = lint_graph(root, entry)
    entry.verification["tensorrt_lint"] = {"enforced": enforced, "passed": not lint_errors(findings),
                                           "findings": [f.to_dict() for f in findings]}
    return not (enforced and lint_errors(findings))


def verify_export(root: str | Path, model: Path | None = None,
                  log: Callable[[str], None] = lambda s: None) -> VerifyResult:
    """Verify every graph of the export folder `root`; rewrites its manifest.json with the results."""
    root = Path(root)
    manifest = load_manifest(root)
    check_integrity(root, manifest)
    _, ort = onnx_modules()
    source = _source_for(manifest, model, root)
    pool, by_part = SessionPool(root), defaultdict(list)
    for entry in manifest.parts:
        by_part[entry.part].append(entry)
    failed = []
    for part, entries in by_part.items():
        if part not in CHECKS:
            raise LanceUsageError(f"{root / 'manifest.json'}: unknown part {part!r}")
        log(f"verifying {part} ({len(entries)} graph{'s' if len(entries) > 1 else ''})")
        comps = CHECKS[part](source, entries, pool.run)
        for entry in entries:
            mine = [c for c in comps if c.entry == entry.name]
            numerics = _record(entry, mine, pool.used.get(entry.name, "none"), ort.__version__)
            if not (_lint(root, entry, target_of(manifest) == "tensorrt") and numerics):
                failed.append(entry.name)
    write_manifest(root, manifest)
    return VerifyResult(manifest, failed)
