"""One recipe rule: which tensors (``match``) get which format and algorithm (a ``QuantChoice``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lance_deploy.core.schema import SchemaError as RecipeError
from lance_deploy.core.schema import check_keys, expect, fail, one_of
from lance_deploy.formats.base import ACTIVATION_MODES, FORMAT_NAMES, INT4_GROUP_SIZES, FormatError, FormatSpec
from lance_deploy.quant.algorithms.registry import ALGORITHMS, QUANTIZING, REGISTRY


@dataclass(frozen=True, kw_only=True)
class QuantChoice:
    """How a matched weight is stored and which algorithm chooses its values.

    format:              bf16 | fp8_e4m3 | int8 | int4 | nf4.
    group_size:          int4: 32/64/128/256 columns per scale group; None for the others.
    group_size_fallback: group sizes tried in order when ``group_size`` does not divide a weight's
                         in_features (tiny test models); the plan shows the one used. Empty: error.
    symmetric:           None = the format's default (int4 asymmetric, the rest symmetric).
    algorithm:           rtn | awq | gptq | smoothquant | none; None resolves to 'none' for bf16
                         and 'rtn' otherwise.
    activations:         None (weight-only) or 'dynamic_per_token' (fp8_e4m3 / int8 W8A8).
    params:              keyword arguments of the algorithm (``quant/algorithms/registry.py``).
    """

    format: str
    group_size: int | None = None
    group_size_fallback: tuple[int, ...] = ()
    symmetric: bool | None = None
    algorithm: str | None = None
    activations: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_size_fallback", tuple(self.group_size_fallback))
        object.__setattr__(self, "params", dict(self.params))
        if self.algorithm is None:
            object.__setattr__(self, "algorithm", "none" if self.format == "bf16" else "rtn")

    def validate(self, where: str) -> None:
        """Field-by-field checks; the FormatSpec checks the format/group/activation combination."""
        one_of(self.format, FORMAT_NAMES, f"{where}.format")
        one_of(self.algorithm, ALGORITHMS, f"{where}.algorithm")
        one_of(self.activations, ACTIVATION_MODES, f"{where}.activations")
        if self.group_size is not None:
            expect(self.group_size, (int,), f"{where}.group_size", "an integer or null")
        for g in self.group_size_fallback:
            one_of(g, INT4_GROUP_SIZES, f"{where}.group_size_fallback")
        if self.symmetric is not None:
            expect(self.symmetric, (bool,), f"{where}.symmetric", "true, false or null")
        if (self.format == "bf16") != (self.algorithm == "none"):
            raise fail(f"{where}.algorithm", f"{self.algorithm!r} does not fit format {self.format!r}: "
                       f"bf16 takes algorithm 'none', quantized formats one of {', '.join(QUANTIZING)}")
        if self.algorithm == "smoothquant" and self.activations is None:
            raise fail(f"{where}.algorithm", "smoothquant migrates activation outliers into the weights, which only "
                       "pays with quantized activations; set activations: dynamic_per_token or use awq/gptq")
        self._validate_params(where)
        for g in (self.group_size, *self.group_size_fallback):
            try:
                self.spec(g)
            except FormatError as e:
                raise fail(where, str(e)) from None

    def _validate_params(self, where: str) -> None:
        allowed = REGISTRY[self.algorithm].params
        for k, v in self.params.items():
            if k not in allowed:
                raise fail(f"{where}.params.{k}", f"unknown parameter for {self.algorithm}; allowed: "
                           f"{', '.join(allowed) or 'none'}")
            expect(v, allowed[k], f"{where}.params.{k}", " or ".join(t.__name__ for t in allowed[k]))

    def spec(self, group_size: int | None = None) -> FormatSpec:
        """The FormatSpec for a weight, with ``group_size`` (default: the configured one)."""
        g = self.group_size if group_size is None else group_size
        return FormatSpec(self.format, g, self.symmetric, self.activations)

    def group_size_for(self, in_features: int, name: str) -> int | None:
        """The configured group size, or the first fallback dividing ``in_features``."""
        if self.group_size is None or in_features % self.group_size == 0:
            return self.group_size
        for g in self.group_size_fallback:
            if in_features % g == 0:
                return g
        tried = (self.group_size, *self.group_size_fallback)
        raise RecipeError(f"{name}: group_size {self.group_size} does not divide in_features {in_features} "
                          f"(tried {list(tried)}); add a group_size_fallback or a rule for this tensor")

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "group_size": self.group_size,
                "group_size_fallback": list(self.group_size_fallback), "symmetric": self.symmetric,
                "algorithm": self.algorithm, "activations": self.activations, "params": dict(self.params)}

    @classmethod
    def _convert(cls, d: Any, where: str) -> dict:
        d = check_keys(cls, d, where)
        if "format" not in d:
            raise fail(f"{where}.format", f"required field missing; allowed: {', '.join(FORMAT_NAMES)}")
        fb = d.get("group_size_fallback", [])
        d["group_size_fallback"] = tuple(expect(fb, (list, tuple), f"{where}.group_size_fallback", "a list"))
        d["params"] = expect(d.get("params") or {}, (dict,), f"{where}.params", "a mapping")
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> QuantChoice:
        return cls(**cls._convert(d, where))


@dataclass(frozen=True, kw_only=True)
class QuantRule(QuantChoice):
    """``match`` (globs over canonical names, alternatives joined by '|') plus a QuantChoice.

    First match wins; a glob never applies to a tensor that is not a Linear weight, only a
    literal alternative does (see ``quant/recipe.py``).
    """

    match: str

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.match.split("|"))

    @property
    def catch_all(self) -> bool:
        """A ``'*'`` safety net: matching nothing only means earlier rules covered everything."""
        return "*" in self.patterns

    def matches(self, name: str, linear: bool = True) -> bool:
        """Whether this rule applies to canonical ``name`` (``linear``: is it a Linear weight)."""
        for p in self.patterns:
            if linear and fnmatch.fnmatchcase(name, p):
                return True
            if not linear and p == name:
                return True
        return False

    def validate(self, where: str) -> None:
        expect(self.match, (str,), f"{where}.match", "a glob string such as 'blk.*.gen.*'")
        if any(not p for p in self.patterns):
            raise fail(f"{where}.match", f"{self.match!r} has an empty alternative")
        super().validate(where)

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match, **super().to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> QuantRule:
        d = cls._convert(d, where)
        if "match" not in d:
            raise fail(f"{where}.match", "required field missing (a glob over canonical names)")
        return cls(**d)
