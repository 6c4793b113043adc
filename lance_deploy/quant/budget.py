"""Measured mixed precision (``--budget 12GiB``): the best per-group formats within a byte budget.

1. Every candidate format is resolved over the whole checkpoint with the base recipe's other rules
   (``resolve_plan``), so a group's bytes under a candidate are exactly what the plan will store
   (group-size fallbacks and AWQ runtime divisors included), and everything outside the decoder
   groups (embeddings, lm_head, bridges, ViT, VAE, norms) is a fixed cost set by the base recipe.
2. ``quant/sensitivity.py`` measures each (group, candidate)'s weighted error: the estimated
   contribution to the final output's relative squared error.
3. ``select`` solves the multiple-choice knapsack "minimise Σ error subject to Σ bytes ≤ budget"
   exactly on bytes rounded up to a unit of 1/20000 of the total choice range (so the answer
   never exceeds the budget, and the unit does not depend on the budget: a bigger budget only
   enlarges the feasible set, so the chosen error never grows).
4. The choice becomes a Recipe: one rule per chosen candidate listing its groups, placed before
   the base recipe's rules (first match wins), so ``lance-deploy plan`` shows every tensor's
   format; the recipe keeps the BudgetConfig, so the plan also says whether it fits.

Limits of the estimate (measured on the golden tiny model, 10-step t2i, final-latent SNR): the
mix matches or beats uniform recipes of the same bytes (43.0 dB vs uniform fp8 31.3 dB, equal
to uniform int8 GPTQ), but at the size of the hand-made budget-12gb recipe it chose int4 for
the gen attention and reached 26.1 dB against 28.1 dB. The sum of first-order, single-forward
errors predicted 29.1 dB for it: errors that compound over the denoising loop are not
additive. A group that never reaches a consumed output under the calibration tasks (the last
layer's und MLP under t2i-only calibration) gets gain 0 and the cheapest format, so calibrate
on x2t as well when the understanding expert matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lance_deploy.calibrate.config import CalibrationConfig
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.schema import parse_size
from lance_deploy.core.units import format_bytes
from lance_deploy.quant.plan import QuantPlan, resolve_plan
from lance_deploy.quant.recipe import BudgetConfig, Recipe
from lance_deploy.quant.rule import QuantChoice, QuantRule
from lance_deploy.quant.sensitivity import Group, SensitivityTable, groups_of, measure

AWQ = {"grid": 20, "clip": True}
DEFAULT_CANDIDATES = (
    QuantChoice(format="bf16"),
    QuantChoice(format="int8", algorithm="gptq", params={"damp": 0.01, "block_size": 128}),
    QuantChoice(format="fp8_e4m3", algorithm="rtn"),
    QuantChoice(format="int4", group_size=64, group_size_fallback=(32,), algorithm="awq", params=AWQ),
    QuantChoice(format="int4", group_size=128, group_size_fallback=(64, 32), algorithm="awq", params=AWQ),
)
"""The ladder used when the recipe's ``budget.candidates`` is empty (weight-only, so it runs on
every GPU): bf16, int8 GPTQ, fp8 e4m3, int4 AWQ g64 and g128."""

RESOLUTION = 20000


class BudgetError(LanceUsageError):
    """The budget cannot be met (it is below the smallest candidate everywhere)."""


@dataclass(frozen=True)
class GroupChoice:
    """One row of the budget report."""

    group: Group
    candidate: int
    format: str  # the candidate's label, e.g. 'int4-g64-asym (awq)'
    local: float  # relative squared error of the layer output
    gain: float
    error: float  # gain · local: estimated share of the final relative squared error
    bytes: int


@dataclass
class BudgetResult:
    recipe: Recipe
    plan: QuantPlan
    choices: list[GroupChoice]
    budget_bytes: int
    fixed_bytes: int
    min_bytes: int
    max_bytes: int
    table: SensitivityTable | None = None
    programs: list = field(default_factory=list, repr=False)

    @property
    def total_error(self) -> float:
        return sum(c.error for c in self.choices)

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "plan_bytes": self.plan.total_bytes,
                "fixed_bytes": self.fixed_bytes, "min_bytes": self.min_bytes, "max_bytes": self.max_bytes,
                "total_weighted_error": self.total_error,
                "groups": [{"group": c.group.label, "format": c.format, "local_error": c.local, "gain": c.gain,
                            "weighted_error": c.error, "bytes": c.bytes} for c in self.choices]}


def choice_label(c: QuantChoice) -> str:
    g = f"-g{c.group_size}" if c.group_size else ""
    return f"{c.format}{g}{'-w8a8' if c.activations else ''} ({c.algorithm})"


def candidate_plans(shapes, base: Recipe, candidates) -> list[QuantPlan]:
    """Plan c: candidate c on every decoder Linear ('blk.*'), the base rules for everything else."""
    plans = []
    for c in candidates:
        rule = QuantRule(match="blk.*", **{k: getattr(c, k) for k in QuantChoice.__dataclass_fields__})
        plans.append(resolve_plan(shapes, base.replace(rules=(rule, *base.rules))))
    return plans


def group_bytes(plans: list[QuantPlan], groups: list[Group]) -> np.ndarray:
    """[group, candidate] -> stored bytes of the group's Linears."""
    return np.array([[sum(p.entry(n).bytes for n in g.names) for p in plans] for g in groups], dtype=np.int64)


def select(errors: np.ndarray, sizes: np.ndarray, capacity: int) -> list[int]:
    """Exact multiple-choice knapsack on rounded-up bytes: one candidate per row of ``errors`` /
    ``sizes`` ([group, candidate]) minimising Σ error with Σ sizes ≤ ``capacity``.

    Raises BudgetError when even the smallest candidate of every group does not fit.
    """
    lo = sizes.min(axis=1)
    if lo.sum() > capacity:
        raise BudgetError(f"needs at least {int(lo.sum())} bytes, {capacity} available")
    extra = sizes - lo[:, None]  # the cheapest choice of each group is free
    unit = max(1, math.ceil(int(extra.max(axis=1).sum()) / RESOLUTION))  # independent of capacity
    w = -(-extra // unit)  # ceil: rounding can only overestimate, so the answer always fits
    k = int(min((capacity - lo.sum()) // unit, w.max(axis=1).sum()))
    dp = np.zeros(k + 1)
    picks = []
    for g in range(len(sizes)):
        best, arg = np.full(k + 1, np.inf), np.zeros(k + 1, dtype=np.int64)
        for c in range(sizes.shape[1]):
            if w[g, c] > k:
                continue
            cand = np.full(k + 1, np.inf)
            cand[w[g, c]:] = dp[:k + 1 - w[g, c]] + errors[g, c]
            # strictly better, or as good and smaller: ties go to fewer bytes
            better = (cand < best) | ((cand == best) & (sizes[g, c] < sizes[g, arg]))
            best, arg = np.where(better, cand, best), np.where(better, c, arg)
        dp = best
        picks.append(arg)
    out, left = [0] * len(sizes), k
    for g in range(len(sizes) - 1, -1, -1):
        out[g] = int(picks[g][left])
        left -= int(w[g, out[g]])
    return out


def build_recipe(base: Recipe, candidates, groups: list[Group], assignment: list[int], target) -> Recipe:
    """Per-candidate rules listing their groups, before ``base``'s rules (first match wins)."""
    rules = []
    for c in sorted(set(assignment), key=assignment.index):
        match = "|".join(g.match for g, a in zip(groups, assignment) if a == c)
        rules.append(QuantRule(match=match, **{k: getattr(candidates[c], k) for k in QuantChoice.__dataclass_fields__}))
    return base.replace(
        name=f"{base.name}-budget", rules=(*rules, *base.rules),
        description=f"per-group formats chosen by measured sensitivity within {target} (lance-deploy --budget); "
                    f"other tensors as in recipe {base.name}",
        budget=BudgetConfig(str(target), tuple(candidates)))


def _source(model_path, vit, vae, device):
    import torch

    from lance_deploy.checkpoint import canonical as cn
    from lance_deploy.checkpoint.layout import discover
    from lance_deploy.checkpoint.loader import load_layer
    from lance_deploy.checkpoint.safetensors_io import SafetensorsReader

    layout = discover(model_path, vit=vit, vae=vae)
    cfg = layout.config()
    reader = SafetensorsReader(layout.weights_file)
    dev = torch.device(device)
    return layout, cn.layout_shapes(layout), cfg, (lambda i: load_layer(reader, cfg, i, device=dev))


@dataclass
class BudgetProblem:
    """Everything measured once per checkpoint, recipe and calibration; ``choose`` then answers
    any number of budgets without measuring again."""

    base: Recipe
    candidates: tuple[QuantChoice, ...]
    shapes: dict
    groups: list[Group]
    sizes: np.ndarray  # [group, candidate] bytes
    fixed_bytes: int
    table: SensitivityTable | None = None
    programs: list = field(default_factory=list, repr=False)

    @property
    def min_bytes(self) -> int:
        return self.fixed_bytes + int(self.sizes.min(axis=1).sum())

    @property
    def max_bytes(self) -> int:
        return self.fixed_bytes + int(self.sizes.max(axis=1).sum())

    def errors(self) -> np.ndarray:
        return np.array([[self.table.weighted(g, c) for c in range(len(self.candidates))] for g in self.groups])

    def check(self, budget) -> int:
        """Bytes of ``budget``; BudgetError naming the minimum achievable bytes when it is below."""
        n = parse_size(budget, "budget")
        if n < self.min_bytes:
            raise BudgetError(f"budget {budget} ({n:,} bytes) is below the smallest plan these candidates allow: "
                              f"{format_bytes(self.min_bytes)} ({self.min_bytes:,} bytes: the smallest candidate in every "
                              f"group plus {format_bytes(self.fixed_bytes)} of tensors outside the decoder groups); raise "
                              "the budget or add a smaller candidate")
        return n


def prepare(model_path, recipe: Recipe, *, vit=None, vae=None, device="cpu"):
    """The budget problem of ``recipe`` over the checkpoint, before measuring (headers only)."""
    candidates = tuple(recipe.budget.candidates) if recipe.budget and recipe.budget.candidates else DEFAULT_CANDIDATES
    base = recipe.replace(calibration=recipe.calibration or CalibrationConfig(), budget=None)
    layout, shapes, cfg, layer_at = _source(model_path, vit, vae, device)
    groups = groups_of(shapes)
    plans = candidate_plans(shapes, base, candidates)
    sizes = group_bytes(plans, groups)
    fixed = plans[0].total_bytes - int(sizes[:, 0].sum())
    return BudgetProblem(base, candidates, shapes, groups, sizes, fixed), (layout, cfg, layer_at, plans)


def measure_problem(problem: BudgetProblem, source, *, device="cpu", programs=None, gain_programs: int = 1,
                    progress: bool = False) -> BudgetProblem:
    """Record calibration programs (unless given) and measure every (group, candidate)."""
    layout, cfg, layer_at, plans = source
    if programs is None:
        from lance_deploy.calibrate.collect import collect_calibration

        programs = collect_calibration(layout, problem.base.calibration, device, progress)
    # Probe each group's gain with its cheapest candidate: the largest, most measurable error.
    probe = [int(np.flatnonzero(row == row.min())[-1]) for row in problem.sizes]
    problem.table = measure(cfg, programs, layer_at, plans, problem.groups, device, probe=probe,
                            gain_programs=gain_programs, progress=progress)
    problem.programs = programs
    return problem


def choose(problem: BudgetProblem, budget) -> BudgetResult:
    """The best measured per-group formats within ``budget`` as a Recipe, its plan and the report."""
    budget_bytes = problem.check(budget)
    errors = problem.errors()
    assignment = select(errors, problem.sizes, budget_bytes - problem.fixed_bytes)
    out = build_recipe(problem.base, problem.candidates, problem.groups, assignment, budget)
    plan = resolve_plan(problem.shapes, out)
    if plan.total_bytes > budget_bytes:  # select() guarantees this; a mismatch is a bug, not user error
        raise AssertionError(f"budget plan has {plan.total_bytes} bytes > {budget_bytes}")
    choices = [GroupChoice(g, c, choice_label(problem.candidates[c]), problem.table.local[g][c], problem.table.gain[g],
                           float(errors[i, c]), int(problem.sizes[i, c]))
               for i, (g, c) in enumerate(zip(problem.groups, assignment))]
    return BudgetResult(out, plan, choices, budget_bytes, problem.fixed_bytes, problem.min_bytes, problem.max_bytes,
                        problem.table, problem.programs)


def resolve_budget(model_path, recipe: Recipe, budget=None, *, device="cpu", programs=None, vit=None, vae=None,
                   gain_programs: int = 1, progress: bool = False) -> BudgetResult:
    """Measure, select and rewrite ``recipe`` for ``budget`` (default: ``recipe.budget.target``).

    Candidates come from ``recipe.budget.candidates`` or ``DEFAULT_CANDIDATES``; calibration
    programs from ``programs`` or the recipe's calibration section (defaults when it has none).
    An impossible budget is refused before anything is measured.
    """
    if budget is None and recipe.budget is None:
        raise BudgetError(f"recipe {recipe.name} has no budget section and no budget was given")
    target = budget if budget is not None else recipe.budget.target
    problem, source = prepare(model_path, recipe, vit=vit, vae=vae, device=device)
    problem.check(target)
    measure_problem(problem, source, device=device, programs=programs, gain_programs=gain_programs,
                    progress=progress)
    return choose(problem, target)


def format_report(r: BudgetResult) -> str:
    """One line per group (format, local error, gain, weighted error, bytes), then the totals."""
    head = f"{'group':<18} {'format':<26} {'local':>10} {'gain':>8} {'weighted':>10} {'bytes':>12}"
    rows = [f"{c.group.label:<18} {c.format:<26} {c.local:>10.3e} {c.gain:>8.3f} {c.error:>10.3e} {c.bytes:>12,}"
            for c in r.choices]
    totals = (f"plan {format_bytes(r.plan.total_bytes)} ({r.plan.total_bytes:,} bytes) within budget "
              f"{format_bytes(r.budget_bytes)}; achievable {format_bytes(r.min_bytes)} .. {format_bytes(r.max_bytes)}; "
              f"fixed (outside decoder groups) {format_bytes(r.fixed_bytes)}")
    return "\n".join([head, *rows, "", totals,
                      f"estimated final relative squared error {r.total_error:.3e}"])
