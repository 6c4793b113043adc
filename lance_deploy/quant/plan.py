"""Resolve a recipe over a checkpoint's tensors: one PlanEntry per tensor and projected bytes.

The plan is what ``lance-deploy plan`` prints, what the quantizer executes and what the manifest
records, so "which tensor gets which format" is decided here and nowhere else. Byte counts come
from the formats' own layout tables (``formats.nbytes``), never from a second formula.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lance_deploy import formats
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.core.units import format_bytes
from lance_deploy.formats import FormatSpec
from lance_deploy.model.tree import fold_group_of
from lance_deploy.quant.algorithms.registry import REGISTRY, folds
from lance_deploy.quant.recipe import Recipe, RecipeError
from lance_deploy.quant.rule import QuantRule

BF16_BYTES = 2
SKIP = "skip"
"""PlanEntry.format of tensors that are not stored (``canonical.IGNORED``)."""


@dataclass(frozen=True)
class PlanEntry:
    """How one tensor is stored.

    ``rule_index`` None means the default: a plain bf16 tensor for non-Linear tensors, nothing
    for ignored ones (format 'skip'). Every 2-D tensor a rule matched is stored packed (a
    PackedTensor, bf16 included). ``smooth``: an [in] fp32 activation divisor is stored with it.
    """

    name: str
    shape: tuple[int, ...]
    format: str
    group_size: int | None
    algorithm: str
    activations: str | None
    rule_index: int | None
    bytes: int
    symmetric: bool | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    smooth: bool = False

    @property
    def packed(self) -> bool:
        """True when the tensor is stored as a PackedTensor (a 2-D weight with a FormatSpec)."""
        return self.rule_index is not None and len(self.shape) == 2 and self.format != SKIP

    def spec(self) -> FormatSpec:
        return FormatSpec(self.format, self.group_size, self.symmetric, self.activations)

    @property
    def choice(self) -> tuple[FormatSpec, str, dict]:
        """What the fold rule compares (``registry.folds``)."""
        return self.spec(), self.algorithm, dict(self.params)

    @property
    def expert(self) -> str:
        return cn.expert_of(self.name) or "shared"

    @property
    def component(self) -> str:
        return cn.component_of(self.name)


@dataclass(frozen=True)
class QuantPlan:
    """The resolved plan: entries in checkpoint order, plus totals in bytes."""

    recipe: Recipe
    entries: tuple[PlanEntry, ...]
    unused_rules: tuple[int, ...] = ()

    @property
    def unmatched_warnings(self) -> list[str]:
        """One line per rule that matches no tensor (a typo, or the wrong model), catch-alls aside:
        ``plan`` prints them, ``quantize`` refuses them unless --allow-unmatched."""
        rules = self.recipe.rules
        return [f"rules[{i}] {rules[i].match!r} matches no tensor" for i in self.unused_rules
                if not rules[i].catch_all]

    def by(self, key: str) -> dict[str, int]:
        """Projected bytes grouped by 'expert', 'component' or 'format'."""
        out: dict[str, int] = defaultdict(int)
        for e in self.entries:
            out[getattr(e, key)] += e.bytes
        return dict(out)

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def bf16_bytes(self) -> int:
        """The same tensors all kept in bf16: the baseline the ratio is printed against."""
        return sum(_numel(e.shape) * BF16_BYTES for e in self.entries if e.format != SKIP)

    def entry(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _first_rule(rules: tuple[QuantRule, ...], name: str, linear: bool) -> int | None:
    return next((i for i, r in enumerate(rules) if r.matches(name, linear)), None)


def _entry(name: str, shape: tuple[int, ...], rules: tuple[QuantRule, ...]) -> PlanEntry:
    if name in cn.IGNORED:
        return PlanEntry(name, shape, SKIP, None, "none", None, None, 0)
    linear = cn.is_linear_weight(name)
    idx = _first_rule(rules, name, linear)
    if idx is None:
        if linear:
            raise _Unmatched(name, shape)
        return PlanEntry(name, shape, "bf16", None, "none", None, None, _numel(shape) * BF16_BYTES)
    rule = rules[idx]
    if rule.format == "bf16" and len(shape) != 2:
        return PlanEntry(name, shape, "bf16", None, "none", None, idx, _numel(shape) * BF16_BYTES)
    if len(shape) != 2:
        raise RecipeError(f"rules[{idx}] gives {name} (shape {list(shape)}) format {rule.format}, but only 2-D "
                          "weights can be packed; keep it bf16")
    group = rule.group_size_for(shape[1], name)
    spec = rule.spec(group)
    formats.check_shape(shape, spec, name)
    return PlanEntry(name, shape, spec.name, spec.group_size, rule.algorithm, spec.activations, idx,
                     formats.nbytes(shape, spec), spec.symmetric, dict(rule.params))


class _Unmatched(Exception):
    def __init__(self, name: str, shape: tuple[int, ...]):
        self.text = f"{name} {list(shape)}"


def _entries(shapes: Mapping[str, tuple[int, ...]], recipe: Recipe) -> dict[str, PlanEntry]:
    entries, unmatched = {}, []
    for n in sorted(shapes, key=cn.sort_key):
        try:
            entries[n] = _entry(n, tuple(int(d) for d in shapes[n]), recipe.rules)
        except _Unmatched as e:
            unmatched.append(e.text)
    if unmatched:
        more = f", ... and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        raise RecipeError(f"recipe {recipe.name}: {len(unmatched)} Linear weight(s) match no rule: "
                          f"{', '.join(unmatched[:5])}{more}. Every Linear weight needs a rule; end the rules "
                          "with a catch-all (match: '*')")
    return entries


def _folds(entries: dict[str, PlanEntry], name: str) -> bool:
    """True when `name`'s scale folds into its RMSNorm (``registry.folds`` over its fold group)."""
    group = fold_group_of(cn.leaf_of(name))
    if group is None:
        return False
    sibs = [entries.get(f"blk.{cn.layer_of(name)}.{cn.expert_of(name)}.{leaf}") for leaf in group.linears]
    return folds([s.choice if s is not None and s.packed else None for s in sibs])


def _with_smooth(entries: dict[str, PlanEntry]) -> dict[str, PlanEntry]:
    """Scaled members that do not fold keep their runtime divisor (``smooth``, [in] fp32)."""
    out = {}
    for name, e in entries.items():
        if e.packed and REGISTRY[e.algorithm].group is not None and not _folds(entries, name):
            e = PlanEntry(**{**e.__dict__, "smooth": True, "bytes": e.bytes + e.shape[1] * 4})
        out[name] = e
    return out


def resolve_plan(shapes: Mapping[str, tuple[int, ...]], recipe: Recipe) -> QuantPlan:
    """One PlanEntry per canonical name in ``shapes`` (first matching rule wins).

    Raises RecipeError naming the tensor for an unmatched Linear weight, a packed format on a
    non-2-D tensor, or a group size that does not divide in_features.
    """
    recipe.validate()  # a Recipe built in code has not been through from_dict's checks
    entries = _with_smooth(_entries(shapes, recipe))
    used = {e.rule_index for e in entries.values()}
    unused = tuple(i for i in range(len(recipe.rules)) if i not in used)
    return QuantPlan(recipe, tuple(entries.values()), unused)




def _label(e: PlanEntry) -> str:
    if e.format == SKIP:
        return "skip (regenerated at load)"
    if not e.packed:
        return "bf16"
    return e.spec().label + (" +smooth" if e.smooth else "")


def format_plan(plan: QuantPlan) -> str:
    """One line per tensor (name, shape, format, algorithm, rule, bytes), then the totals."""
    r = plan.recipe
    rows = [(e.name, "x".join(map(str, e.shape)), _label(e), e.algorithm,
             "default" if e.rule_index is None else f"rules[{e.rule_index}]", format_bytes(e.bytes)) for e in plan.entries]
    head = ("tensor", "shape", "format", "algorithm", "rule", "bytes")
    w = [max(len(x[i]) for x in rows + [head]) for i in range(6)]
    def line(x: tuple[str, ...]) -> str:
        return f"{x[0]:<{w[0]}}  {x[1]:>{w[1]}}  {x[2]:<{w[2]}}  {x[3]:<{w[3]}}  {x[4]:<{w[4]}}  {x[5]:>{w[5]}}"

    title = (f"recipe {r.name} (schema {r.schema_version}, target GPU {r.target_gpu}): {len(plan.entries)} tensors, "
             "first matching rule wins")
    out = [title, "", line(head)] + [line(x) for x in rows] + [""]
    for key in ("expert", "component", "format"):
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(plan.by(key).items()))
        out.append(f"by {key}: {parts}")
    ratio = plan.total_bytes / plan.bf16_bytes if plan.bf16_bytes else 1.0
    out.append(f"total: {format_bytes(plan.total_bytes)} ({plan.total_bytes:,} bytes; bf16 {format_bytes(plan.bf16_bytes)}, "
               f"x{ratio:.3f})")
    if r.budget is not None:
        fits = "fits" if plan.total_bytes <= r.budget.target_bytes else "EXCEEDS"
        out.append(f"budget {r.budget.target}: projected weights {fits}")
    out += [f"warning: {w}" for w in plan.unmatched_warnings]
    return "\n".join(out)


def entry_to_dict(e: PlanEntry) -> dict[str, Any]:
    return {"name": e.name, "shape": list(e.shape), "format": e.format, "group_size": e.group_size,
            "symmetric": e.symmetric, "algorithm": e.algorithm, "activations": e.activations,
            "params": dict(e.params), "smooth": e.smooth, "packed": e.packed, "rule_index": e.rule_index,
            "expert": e.expert, "component": e.component, "bytes": e.bytes}


def plan_to_dict(plan: QuantPlan) -> dict[str, Any]:
    """JSON-ready plan: the resolved recipe, every entry and the byte totals."""
    return {"recipe": plan.recipe.to_dict(), "tensors": [entry_to_dict(e) for e in plan.entries],
            "totals": {"bytes": plan.total_bytes, "bf16_bytes": plan.bf16_bytes, "by_expert": plan.by("expert"),
                       "by_component": plan.by("component"), "by_format": plan.by("format")},
            "unused_rules": list(plan.unused_rules), "warnings": plan.unmatched_warnings}


def plan_checkpoint(path, recipe: Recipe, *, vit=None, vae=None, variant: str | None = None) -> QuantPlan:
    """Stage function behind ``lance-deploy plan``: discover the model, read headers, resolve."""
    from lance_deploy.checkpoint.layout import discover
    from lance_deploy.config import LLMConfig

    layout = discover(path, vit=vit, vae=vae, variant=variant)
    layout.check_keys(LLMConfig.from_file(layout.config_file))  # missing or transposed tensors: refused
    return resolve_plan(cn.layout_shapes(layout), recipe)
