"""Header-only inspection: parameter counts, bytes and stored dtypes per component.

Nothing here reads tensor data: safetensors sizes come from the JSON headers, the
VAE's from ``torch.load(mmap=True)`` (which parses only the pickle index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lance_deploy.checkpoint.layout import ReleaseLayout, discover_all
from lance_deploy.checkpoint.loader import load_vae_state_dict
from lance_deploy.checkpoint.make_vae import derived_vae_shapes
from lance_deploy.checkpoint.names import (
    COMPONENTS,
    check_keys,
    component_of,
    expected_lance_shapes,
    expected_vit_shapes,
)
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader, dtype_tag
from lance_deploy.core.errors import CheckpointError
from lance_deploy.core.units import format_bytes

NOTES = {"latent_pos_embed": "regenerated at load; stored copy ignored"}


@dataclass
class ComponentStats:
    """Size of one component as stored on disk."""

    name: str
    params: int = 0
    nbytes: int = 0
    tensors: int = 0
    dtypes: set[str] = field(default_factory=set)
    file: Path | None = None
    note: str = ""

    def add(self, shape: tuple[int, ...], nbytes: int, dtype: str) -> None:
        self.params += math.prod(shape)
        self.nbytes += nbytes
        self.tensors += 1
        self.dtypes.add(dtype)


@dataclass
class ModelReport:
    """Everything ``inspect`` says about one model folder."""

    layout: ReleaseLayout
    components: list[ComponentStats]
    problems: list[str]

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components)

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.components)

    @property
    def loaded_params(self) -> int:
        """Parameters actually used (the stored latent table is regenerated, not loaded)."""
        return sum(c.params for c in self.components if c.name != "latent_pos_embed")

    @property
    def loaded_bytes(self) -> int:
        return sum(c.nbytes for c in self.components if c.name != "latent_pos_embed")


def _vae_stats(path: Path, stats: dict[str, ComponentStats], problems: list[str]) -> None:
    sd = load_vae_state_dict(path)
    for k, t in sd.items():
        comp = component_of(k)
        if comp not in ("vae_encoder", "vae_decoder"):
            comp = "other"
        stats.setdefault(comp, ComponentStats(comp, file=path)).add(tuple(t.shape), t.numel() * t.element_size(),
                                                                   dtype_tag(t.dtype))
    try:  # the widths are readable from two shapes (golden README §2)
        enc, dec = sd["encoder.conv1.weight"].shape[0], sd["decoder.conv1.weight"].shape[0] // 4
        check_keys(sd, derived_vae_shapes(enc, dec), str(path))
        for c, dim in (("vae_encoder", enc), ("vae_decoder", dec)):
            if c in stats:
                stats[c].note = f"base dim {dim}"
    except KeyError as e:
        problems.append(f"{path}: missing {e.args[0]}; not a Wan2.2 VAE state dict")
    except CheckpointError as e:
        problems.append(str(e))


def inspect_model(layout: ReleaseLayout) -> ModelReport:
    """Per-component sizes of one model, its ViT and its VAE, plus any layout problems."""
    stats: dict[str, ComponentStats] = {}
    problems: list[str] = []
    try:
        cfg = layout.config()
    except CheckpointError as e:
        cfg, problems = None, [str(e)]
    with SafetensorsReader(layout.weights_file) as r:
        for info in r.infos().values():
            comp = component_of(info.name)
            stats.setdefault(comp, ComponentStats(comp, file=layout.weights_file)).add(info.shape, info.nbytes,
                                                                                      info.dtype)
        if cfg is not None:
            try:
                check_keys(r, expected_lance_shapes(cfg, layout.variant), str(layout.weights_file))
            except CheckpointError as e:
                problems.append(str(e))
    if "vit" in stats:
        stats["vit"].note = "bundled in the model file (used; standalone ViT ignored)"
    elif layout.vit_file is not None:
        with SafetensorsReader(layout.vit_file) as r:
            vit = stats["vit"] = ComponentStats("vit", file=layout.vit_file, note="standalone")
            for info in r.infos().values():
                vit.add(info.shape, info.nbytes, info.dtype)
            if cfg is not None:
                try:
                    check_keys(r, expected_vit_shapes(cfg.vision), str(layout.vit_file))
                except CheckpointError as e:
                    problems.append(str(e))
    if layout.vae_file is not None:
        _vae_stats(layout.vae_file, stats, problems)
    for name, note in NOTES.items():
        if name in stats:
            stats[name].note = note
    order = list(COMPONENTS) + ["other"]
    comps = sorted(stats.values(), key=lambda c: order.index(c.name))
    return ModelReport(layout, comps, problems)


def inspect_path(path: str | Path, vit: str | Path | None = None,
                 vae: str | Path | None = None) -> list[ModelReport]:
    """Inspect a download folder (both variants) or one model folder."""
    return [inspect_model(lay) for lay in discover_all(path, vit, vae)]


def report_to_dict(rep: ModelReport) -> dict:
    """JSON-ready form of one report."""
    lay = rep.layout
    files = {"weights": lay.weights_file, "config": lay.config_file, "tokenizer_dir": lay.tokenizer_dir,
             "vit": lay.vit_file, "vae": lay.vae_file}
    return {
        "model_dir": str(lay.model_dir), "variant": lay.variant, "stored_dtype": lay.stored_dtype,
        "has_bundled_vit": lay.has_bundled_vit, "num_tensors": lay.num_tensors, "latent_rows": lay.latent_rows,
        "files": {k: (str(v) if v is not None else None) for k, v in files.items()},
        "components": {c.name: {"params": c.params, "bytes": c.nbytes, "tensors": c.tensors,
                                "dtypes": sorted(c.dtypes), "file": str(c.file), "note": c.note}
                       for c in rep.components},
        "total": {"params": rep.total_params, "bytes": rep.total_bytes},
        "total_loaded": {"params": rep.loaded_params, "bytes": rep.loaded_bytes},
        "problems": rep.problems,
    }




def format_report(rep: ModelReport) -> str:
    """Aligned text table of one report, with the files used and totals."""
    lay = rep.layout
    lines = [f"{lay.model_dir}  (variant {lay.variant}, stored {lay.stored_dtype}, {lay.num_tensors} tensors)"]
    for label, p in (("weights", lay.weights_file), ("config", lay.config_file), ("tokenizer", lay.tokenizer_dir),
                     ("vit", lay.weights_file if lay.has_bundled_vit else lay.vit_file), ("vae", lay.vae_file)):
        extra = " (bundled vit_model.*)" if label == "vit" and lay.has_bundled_vit else ""
        lines.append(f"  {label:<10}{p if p is not None else 'not found'}{extra}")
    rows = [(c.name, f"{c.params:,}", format_bytes(si=True, n=c.nbytes), ",".join(sorted(c.dtypes)), c.note)
            for c in rep.components]
    rows.append(("total", f"{rep.total_params:,}", format_bytes(si=True, n=rep.total_bytes), "", ""))
    rows.append(("total loaded", f"{rep.loaded_params:,}", format_bytes(si=True, n=rep.loaded_bytes), "",
                 "without the stored latent table"))
    head = ("component", "params", "bytes", "dtypes", "note")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    fmt = lambda r: f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:<{w[3]}}  {r[4]}".rstrip()  # noqa: E731
    lines += ["", fmt(head)] + [fmt(r) for r in rows[:-2]] + ["  " + "-" * (sum(w) + 8)]
    lines += [fmt(r) for r in rows[-2:]]
    lines += [f"  problem: {p}" for p in rep.problems] or ["  layout: matches the release key table"]
    return "\n".join(lines)
