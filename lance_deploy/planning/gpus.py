"""GPU presets (`--preset rtx4090` ...): per card, a shipped recipe, a device budget and a marker
policy, from `recipes/presets/gpus.yaml` (validated field by field when read)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lance_deploy.core import schema, yamlio
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.planning.planner import MARKER_POLICIES
from lance_deploy.planning.weights import RECIPES as WEIGHT_FORMATS

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
"""The shipped recipes, one `<name>.yaml` each (`quant.recipe.load_recipe` reads them by name)."""
PRESETS_FILE = RECIPES_DIR / "presets" / "gpus.yaml"
PRESET_NAMES = ("rtx4090", "rtx4080", "rtx3090", "rtx4060ti-16gb", "l40s", "h100")
"""The `--preset` choices (the table must define exactly these)."""


@dataclass(frozen=True)
class GpuPreset:
    name: str
    card: str
    budget: int  # bytes
    budget_text: str  # as the table writes it ('22GiB'): what --gpu-memory would be given
    recipe: str  # a shipped recipe name
    weights: str  # memory-plan's --weights for a release folder
    markers: str  # one of MARKER_POLICIES

    def to_dict(self) -> dict:
        return {"name": self.name, "card": self.card, "budget": self.budget_text, "budget_bytes": self.budget,
                "recipe": self.recipe, "weights": self.weights, "markers": self.markers}


def parse_presets(doc, where: str) -> dict[str, GpuPreset]:
    """The preset table from its YAML data; every field checked, unknown ones refused."""
    if not isinstance(doc, dict):
        raise schema.fail(where, "expected a mapping with schema_version and presets")
    for k in doc:
        if k not in ("schema_version", "presets"):
            raise schema.fail(f"{where}: {k}", "unknown field; allowed: schema_version, presets")
    schema.require(doc, ("schema_version", "presets"), where)
    schema.one_of(doc["schema_version"], (1,), f"{where}: schema_version")
    table = doc["presets"]
    if not isinstance(table, dict) or set(table) != set(PRESET_NAMES):
        got = ", ".join(map(str, table)) if isinstance(table, dict) else type(table).__name__
        raise schema.fail(f"{where}: presets", f"expected exactly {', '.join(PRESET_NAMES)}; got {got}")
    shipped = tuple(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    out = {}
    for name, entry in table.items():
        at = f"{where}: presets.{name}"
        d = schema.check_keys(GpuPreset, {"name": name, **entry} if isinstance(entry, dict) else entry, at)
        if "budget_text" in entry:
            raise schema.fail(f"{at}.budget_text", "unknown field; the budget is `budget`")
        schema.require(d, ("card", "budget", "recipe", "weights", "markers"), at)
        out[name] = GpuPreset(
            name=name, card=schema.expect(d["card"], (str,), f"{at}.card", "a string"),
            budget=schema.parse_size(d["budget"], f"{at}.budget"), budget_text=str(d["budget"]),
            recipe=schema.one_of(d["recipe"], shipped, f"{at}.recipe"),
            weights=schema.one_of(d["weights"], WEIGHT_FORMATS, f"{at}.weights"),
            markers=schema.one_of(d["markers"], MARKER_POLICIES, f"{at}.markers"))
    return out


@lru_cache(maxsize=1)
def presets() -> dict[str, GpuPreset]:
    return parse_presets(yamlio.load_file(PRESETS_FILE), str(PRESETS_FILE))


def preset(name: str) -> GpuPreset:
    table = presets()
    if name not in table:
        raise LanceUsageError(f"--preset {name!r}: expected one of {', '.join(PRESET_NAMES)}")
    return table[name]
