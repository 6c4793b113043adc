"""Weight bytes per component and per expert layer, from headers only.

Every tensor becomes a `TensorEntry` (name, component, layer, shape, device bytes). From the
release files the bytes are `numel x itemsize(load dtype)`: floating tensors are cast on load,
so the stored F32/BF16 does not matter. A quantized artifact's manifest can feed the same
`inventory()` with its own per-tensor byte counts (`manifest_entries`, packed fields included),
and `apply_recipe` predicts them for a hypothetical recipe with the format tables of `lance_deploy.formats`.

Release numbers at bf16 (lance.md §1.3; the tests check them on a header-only full checkpoint):

| component      | what                                               | params        | bf16 bytes    |
|----------------|----------------------------------------------------|---------------|---------------|
| und_expert     | 36 layers x 77,077,248                             | 2,774,780,928 | 5,549,561,856 |
| gen_expert     | the `_moe_gen` twin                                | 2,774,780,928 | 5,549,561,856 |
| embed_tokens   | 151936 x 2048 (kept on the host)                   |   311,164,928 |   622,329,856 |
| lm_head        | 151936 x 2048 (x2t only)                           |   311,164,928 |   622,329,856 |
| norms_bridges  | norm, norm_moe_gen, time_embedder, vae2llm/llm2vae |     4,925,488 |     9,850,976 |
| vit            | Qwen2.5-VL ViT (bundled or standalone)             |   668,684,288 | 1,337,368,576 |
| vae_encoder    | Wan2.2 encoder + conv1                             |   149,637,088 |   299,274,176 |
| vae_decoder    | conv2 + decoder                                    |   555,051,580 | 1,110,103,160 |

One expert layer is 154,154,496 B at bf16 (the unit the planner streams); packed by a recipe
an expert is 2,779,158,528 B (fp8 / int8, per-channel fp32 scales: half) or 1,496,143,872 B
(int4, groups of 128). The stored `latent_pos_embed` table is never loaded (regenerated on the
fly), so it counts nowhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from lance_deploy.checkpoint.layout import ReleaseLayout
from lance_deploy.checkpoint.names import LATENT_POS_KEY, VIT_PREFIX, component_of, layer_of
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader, TensorInfo
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.model.tree import expert_of
from lance_deploy.pipeline.tasks import TaskSpec

COMPONENTS = ("und_expert", "gen_expert", "embed_tokens", "lm_head", "norms_bridges", "vit", "vae_encoder",
              "vae_decoder")
EXPERTS = ("und_expert", "gen_expert")
RECIPES = ("fp8", "int8", "int4")
"""Hypothetical recipes for suggestions: the 7 Linear weights of every expert layer packed
(fp8_e4m3 / int8 per output channel, int4 asymmetric groups of 128); the rest stays at the load dtype,
as the community recipes keep ViT, lm_head, embeddings and bridges in bf16."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as it sits on the device: `nbytes` after the cast (or packing)."""

    name: str
    component: str  # one of COMPONENTS, or 'unused' (the regenerated latent table)
    layer: int | None  # expert layer index, for the two experts
    shape: tuple[int, ...]
    nbytes: int
    gen_only: bool = False  # norms_bridges entries that only the generation path loads


def classify(name: str, source: str) -> tuple[str, int | None, bool]:
    """(component, layer, gen_only) of a key from the 'llm', 'vit' or 'vae' file.

    Final norms and the latent bridges form `norms_bridges` (small, always resident while the
    LLM runs); `norm_moe_gen` and the bridges exist only with the generation expert.
    """
    if source == "vit":
        return "vit", None, False
    if source == "vae":
        part = component_of(name)
        if part not in ("vae_encoder", "vae_decoder"):
            raise LanceUsageError(f"VAE key {name!r} is neither encoder nor decoder")
        return part, None, False
    if name == LATENT_POS_KEY:
        return "unused", None, False
    if name.startswith("language_model.model.norm"):
        return "norms_bridges", None, expert_of(name) == "gen"
    part = component_of(name)
    if part == "bridges":
        return "norms_bridges", None, True
    if part in EXPERTS:
        return part, layer_of(name), part == "gen_expert"
    if part in ("embed_tokens", "lm_head"):
        return part, None, False
    raise LanceUsageError(f"unexpected key {name!r} in the LLM weights")


def _entry(name: str, source: str, shape: tuple[int, ...], nbytes: int) -> TensorEntry:
    component, layer, gen_only = classify(name, source)
    return TensorEntry(name, component, layer, tuple(shape), nbytes, gen_only)


def _load_bytes(info: TensorInfo, dtype: torch.dtype) -> int:
    # The loader casts floating tensors only (checkpoint.loader._fetch); others keep their bytes.
    if info.dtype.startswith(("F", "BF")):
        return info.numel * torch.empty((), dtype=dtype).element_size()
    return info.nbytes


def safetensors_entries(path, source: str, dtype: torch.dtype, prefix: str = "",
                        skip_prefix: str | None = None) -> list[TensorEntry]:
    """Entries of one safetensors file (header only); `prefix` is stripped, `skip_prefix` keys ignored."""
    out = []
    with SafetensorsReader(path) as reader:
        for name, info in reader.infos().items():
            if skip_prefix and name.startswith(skip_prefix):
                continue
            if prefix and not name.startswith(prefix):
                continue
            out.append(_entry(name[len(prefix):], source, info.shape, _load_bytes(info, dtype)))
    return out


def vae_entries(path, dtype: torch.dtype) -> list[TensorEntry]:
    """Entries of `Wan2.2_VAE.pth`: `torch.load(mmap=True)` parses the pickle index only."""
    from lance_deploy.checkpoint.loader import load_vae_state_dict

    size = torch.empty((), dtype=dtype).element_size()
    sd = load_vae_state_dict(path)
    return [_entry(k, "vae", tuple(t.shape), t.numel() * (size if t.is_floating_point() else t.element_size()))
            for k, t in sd.items()]


def release_entries(layout: ReleaseLayout, dtype: torch.dtype, spec: TaskSpec) -> list[TensorEntry]:
    """Every tensor `spec` may load from a release layout, with its bytes at `dtype`.

    The ViT comes from where the pipeline takes it (bundled `vit_model.*` wins); the ViT and VAE
    files are only opened when the task needs them, as the loader does.
    """
    entries = safetensors_entries(layout.weights_file, "llm", dtype, skip_prefix=VIT_PREFIX)
    if spec.vit:
        src = layout.require_vit()
        entries += safetensors_entries(src.file, "vit", dtype, prefix=src.prefix)
    if spec.vae_encoder or spec.vae_decoder:
        entries += vae_entries(layout.require_vae(), dtype)
    return entries


def manifest_entries(manifest, dtype: torch.dtype) -> list[TensorEntry]:
    """Entries of a quantized artifact's `manifest.json` (`export.artifact_manifest.ArtifactManifest`,
    duck-typed): packed tensors count their stored fields (qdata, scale, zero_point, smooth);
    plain floating tensors count at the load dtype, as the artifact loader casts them like the
    release loader. Canonical `vit.X` / `vae.X` names say which file a tensor stands for."""
    size = dtype_bytes(dtype)
    out = []
    for t in manifest.tensors:
        if t.name.startswith(("vit.", "vae.")):
            source, key = t.name[:3], t.name[4:]
        else:
            source, key = "llm", t.release_name
        numel = 1
        for d in t.shape:
            numel *= d
        stored = next(iter(t.fields.values())).dtype if t.fields else "F"
        plain_float = t.spec is None and stored.startswith(("F", "BF"))
        out.append(_entry(key, source, tuple(t.shape), numel * size if plain_float else t.nbytes))
    return out


def recipe_bytes(shape: tuple[int, ...], recipe: str) -> int | None:
    """Packed bytes of one [out, in] weight under `recipe`, or None if the format cannot take it."""
    from lance_deploy.formats import FormatError, FormatSpec, nbytes

    spec = {"fp8": FormatSpec("fp8_e4m3"), "int8": FormatSpec("int8"),
            "int4": FormatSpec("int4", group_size=128)}[recipe]
    try:
        return nbytes((int(shape[0]), int(shape[1])), spec)
    except FormatError:  # e.g. tiny widths that no int4 group divides
        return None


def apply_recipe(entries: Iterable[TensorEntry], recipe: str | None) -> list[TensorEntry]:
    """Entries with every expert Linear weight ([out, in], `*.weight`) packed by `recipe`."""
    if recipe is None:
        return list(entries)
    if recipe not in RECIPES:
        raise LanceUsageError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    out = []
    for e in entries:
        packed = None
        if e.component in EXPERTS and len(e.shape) == 2 and e.name.endswith(".weight"):
            packed = recipe_bytes(e.shape, recipe)
        out.append(e if packed is None else replace(e, nbytes=packed))
    return out


@dataclass(frozen=True)
class WeightInventory:
    """Device bytes of what one task loads: per component, and per layer for the two experts."""

    components: dict[str, int]
    layers: dict[str, tuple[int, ...]]  # expert -> bytes of layer 0..L-1 (empty if not loaded)
    recipe: str  # 'bfloat16', 'float32', ... or a RECIPES name
    compact: dict = field(default_factory=dict)  # 'int8' / 'int4' -> bytes of each und layer's marker copy

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def layer_bytes(self, expert: str) -> int:
        """The largest layer of `expert` (the size of one streaming buffer)."""
        return max(self.layers.get(expert) or (0,))

    def num_layers(self, expert: str) -> int:
        return len(self.layers.get(expert) or ())


def loads(entry: TensorEntry, spec: TaskSpec) -> bool:
    """Whether `LancePipeline.from_path` allocates this tensor for a task with `spec`."""
    c = entry.component
    if c == "unused":
        return False
    if c in ("und_expert", "embed_tokens"):
        return True
    if c == "gen_expert":
        return spec.gen
    if c == "norms_bridges":
        return spec.gen or not entry.gen_only
    return bool(getattr(spec, c))  # lm_head, vit, vae_encoder, vae_decoder


def inventory(entries: Iterable[TensorEntry], spec: TaskSpec, recipe: str) -> WeightInventory:
    """Sum the entries `spec` loads into components and expert layers."""
    comps = {c: 0 for c in COMPONENTS}
    per_layer: dict[str, dict[int, int]] = {e: {} for e in EXPERTS}
    for e in entries:
        if not loads(e, spec):
            continue
        comps[e.component] += e.nbytes
        if e.component in EXPERTS:
            layers = per_layer[e.component]
            layers[e.layer] = layers.get(e.layer, 0) + e.nbytes
    layers = {k: tuple(v[i] for i in sorted(v)) for k, v in per_layer.items()}
    return WeightInventory({c: b for c, b in comps.items() if b or c in EXPERTS}, layers, recipe)


def compact_layers(entries: Iterable[TensorEntry], fmt: str) -> tuple[int, ...]:
    """Bytes of each und layer packed as the marker copy `fmt` (`runtime.markers`): each Linear
    weight at the format's size where that is smaller, everything else as loaded."""
    per: dict[int, int] = {}
    for e in entries:
        if e.component != "und_expert":
            continue
        n = e.nbytes
        if len(e.shape) == 2 and e.name.endswith(".weight"):
            n = min(n, recipe_bytes(e.shape, fmt) or n)
        per[e.layer] = per.get(e.layer, 0) + n
    return tuple(per[i] for i in sorted(per))


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["COMPONENTS", "EXPERTS", "RECIPES", "TensorEntry", "WeightInventory", "apply_recipe", "classify",
           "compact_layers",
           "dtype_bytes", "inventory", "loads", "manifest_entries", "recipe_bytes", "release_entries",
           "safetensors_entries", "vae_entries"]
