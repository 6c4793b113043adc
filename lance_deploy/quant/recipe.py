"""Quantization recipes: typed, versioned config objects; YAML is only their serialisation.

Precedence (also in recipes/README.md):

1. ``rules`` are ordered. For each tensor the FIRST rule whose ``match`` matches its canonical
   name (``checkpoint/canonical.py``) decides its format; later rules are not consulted.
2. ``match`` is an ``fnmatch`` glob over canonical names (``*`` also crosses dots); several
   alternatives are separated by ``|``: ``"blk.*.gen.attn_o|blk.*.gen.ffn_down"``.
3. Every Linear weight must be matched by some rule, or planning fails naming the tensor; the
   shipped recipes end with a catch-all ``"*"`` rule.
4. Tensors that are not Linear weights (norms, biases, embeddings, conv kernels) are stored in
   bf16 and glob patterns never touch them. A rule applies to one only when an alternative names
   it literally, without wildcards (e.g. ``match: embed_tokens``).
5. ``latent_pos_embed`` is regenerated at load, so it is never stored whatever the rules say.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lance_deploy.calibrate.config import CalibrationConfig
from lance_deploy.core.schema import SchemaError as RecipeError
from lance_deploy.core.schema import check_keys, expect, fail, one_of, parse_size
from lance_deploy.formats.base import ACTIVATION_MODES, FORMAT_NAMES, FormatError
from lance_deploy.planning.gpus import RECIPES_DIR  # where the shipped recipes live
from lance_deploy.quant.algorithms.registry import ALGORITHMS, CALIBRATED
from lance_deploy.quant.rule import QuantChoice, QuantRule

SCHEMA_VERSION = 1
TARGET_GPUS = ("ada-hopper", "ampere", "any")

__all__ = ["ACTIVATION_MODES", "ALGORITHMS", "FORMAT_NAMES", "SCHEMA_VERSION", "TARGET_GPUS", "BudgetConfig",
           "CalibrationConfig", "QuantChoice", "QuantRule", "Recipe", "RecipeError", "load_recipe",
           "shipped_recipes"]  # fmt: skip


@dataclass(frozen=True)
class BudgetConfig:
    """Measured mixed precision (``--budget``): choose per-layer formats among ``candidates`` so
    that the projected weight bytes of the plan stay within ``target`` (e.g. '12GiB')."""

    target: str
    candidates: tuple[QuantChoice, ...] = ()

    @property
    def target_bytes(self) -> int:
        return parse_size(self.target, "budget.target")

    def validate(self, where: str = "budget") -> None:
        expect(self.target, (str, int), f"{where}.target", "a size such as 12GiB")
        parse_size(self.target, f"{where}.target")
        for i, c in enumerate(self.candidates):
            c.validate(f"{where}.candidates[{i}]")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "candidates": [c.to_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: Any, where: str = "budget") -> BudgetConfig:
        d = check_keys(cls, d, where)
        cands = expect(d.get("candidates", []), (list, tuple), f"{where}.candidates", "a list")
        d["candidates"] = tuple(QuantChoice.from_dict(c, f"{where}.candidates[{i}]") for i, c in enumerate(cands))
        return cls(**d)


@dataclass(frozen=True)
class Recipe:
    """A named, versioned quantization recipe; see the module docstring for rule precedence."""

    name: str
    rules: tuple[QuantRule, ...]
    description: str = ""
    target_gpu: str = "any"
    calibration: CalibrationConfig | None = None
    budget: BudgetConfig | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def validate(self, where: str = "") -> Recipe:
        """Check every field; raises RecipeError naming the field and the allowed values."""
        p = f"{where}: " if where else ""
        if self.schema_version != SCHEMA_VERSION:
            raise RecipeError(f"{p}schema_version {self.schema_version!r} not supported; this lance-deploy "
                              f"reads schema_version {SCHEMA_VERSION}")
        expect(self.name, (str,), p + "name", "a non-empty string")
        if not self.name.strip():
            raise fail(p + "name", "must not be empty")
        expect(self.description, (str,), p + "description", "a string")
        one_of(self.target_gpu, TARGET_GPUS, p + "target_gpu")
        if not self.rules:
            raise fail(p + "rules", "at least one rule is needed (end with a catch-all match: '*')")
        for i, rule in enumerate(self.rules):
            rule.validate(f"{p}rules[{i}]")
        calibrated = [i for i, r in enumerate(self.rules) if r.algorithm in CALIBRATED]
        if calibrated and self.calibration is None:
            raise fail(p + "calibration", f"rules {calibrated} use calibrated algorithms "
                       f"({', '.join(CALIBRATED)}) but the recipe has no calibration section")
        if self.calibration is not None:
            self.calibration.validate(p + "calibration")
        if self.budget is not None:
            self.budget.validate(p + "budget")
        return self

    @property
    def needs_calibration(self) -> bool:
        """A calibrated algorithm, or W8A8 rules with a calibration section (their static activation
        amax for ``export --target tensorrt`` is recorded from it)."""
        w8a8 = self.calibration is not None and any(r.activations is not None for r in self.rules)
        return w8a8 or any(r.algorithm in CALIBRATED for r in self.rules)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form with every default resolved (manifests and job fingerprints use it)."""
        return {
            "schema_version": self.schema_version, "name": self.name, "description": self.description,
            "target_gpu": self.target_gpu, "rules": [r.to_dict() for r in self.rules],
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "budget": None if self.budget is None else self.budget.to_dict(),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> Recipe:
        """Strict inverse of ``to_dict``: unknown fields are errors; the result is validated."""
        p = f"{where}: " if where else ""
        version = d.get("schema_version", SCHEMA_VERSION) if isinstance(d, dict) else SCHEMA_VERSION
        if version != SCHEMA_VERSION:  # before anything else: a newer schema may have new fields
            raise RecipeError(f"{p}schema_version {version!r} not supported; this lance-deploy reads "
                              f"schema_version {SCHEMA_VERSION}")
        d = check_keys(cls, d, where)
        for req in ("name", "rules"):
            if req not in d:
                raise fail(p + req, "required field missing")
        rules = expect(d["rules"], (list, tuple), p + "rules", "a list of rules")
        d["rules"] = tuple(QuantRule.from_dict(r, f"{p}rules[{i}]") for i, r in enumerate(rules))
        if d.get("calibration") is not None:
            d["calibration"] = CalibrationConfig.from_dict(d["calibration"], p + "calibration")
        if d.get("budget") is not None:
            d["budget"] = BudgetConfig.from_dict(d["budget"], p + "budget")
        try:
            return cls(**d).validate(where)
        except FormatError as e:
            raise RecipeError(f"{p}{e}") from None

    def to_yaml(self) -> str:
        """YAML text that ``from_yaml`` reads back to an equal Recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read and validate a recipe file; errors name the file and the field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{path}: recipe file not found") from None
        except OSError as e:
            raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise RecipeError(f"{path}: not valid YAML (not UTF-8 text: byte {e.start})") from None
        return cls.from_yaml_text(text, str(path))

    @classmethod
    def from_yaml_text(cls, text: str, where: str = "<recipe>") -> Recipe:
        try:
            return cls.from_dict(yaml.safe_load(text), where)
        except yaml.YAMLError as e:
            raise _yaml_error(where, e) from None
        except RecursionError:  # the parser and the schema walk recurse per nesting level
            raise RecipeError(f"{where}: nested too deeply to be a recipe") from None
        except ValueError as e:  # PyYAML's int(): a number past sys.get_int_max_str_digits() (fuzz corpus)
            raise RecipeError(f"{where}: not valid YAML ({str(e).splitlines()[0][:100]})") from None

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


def _yaml_error(where: str, e: yaml.YAMLError) -> RecipeError:
    """One line naming the file, line and column (PyYAML's own text spans several, with a caret)."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    if isinstance(e, yaml.MarkedYAMLError):
        mark, context = e.problem_mark or e.context_mark, " ".join(str(e.context or "").split())
        if context and e.context_mark is not None and e.problem_mark is not None:
            context += f" (from {at(e.context_mark)})"
        what = "; ".join(x for x in (context, " ".join(str(e.problem or "").split())) if x) or type(e).__name__
        if "tag:yaml.org,2002:python/" in what:
            what += " (recipes are plain data: python tags are never constructed)"
        return RecipeError(f"{where}: not valid YAML{' at ' + at(mark) if mark else ''}: {what}")
    text = " ".join(str(e).split()).replace(' in "<unicode string>",', " at")  # a ReaderError: no line
    return RecipeError(f"{where}: not valid YAML: {text}")


def shipped_recipes() -> list[str]:
    """Names of the recipes in ``recipes/`` (file stems)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe from a YAML path, or a shipped recipe by name ('fp8-ada-hopper')."""
    path = Path(name_or_path)
    if path.is_file():
        return Recipe.from_yaml(path)
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and (RECIPES_DIR / f"{stem}.yaml").is_file():
        return Recipe.from_yaml(RECIPES_DIR / f"{stem}.yaml")
    raise RecipeError(f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe; shipped: "
                      f"{', '.join(shipped_recipes()) or 'none found'}")

