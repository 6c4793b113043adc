"""Per-group quantization sensitivity: how much the final output suffers when one group of Linears
takes one candidate format while everything else stays at full precision.

A *group* is one (layer, expert, part) with part 'attn' (q/k/v/o) or 'mlp' (gate/up/down). The
unit matches the fold groups of AWQ/SmoothQuant (q/k/v share a norm, gate/up share a norm), so a
group's bytes and error are the same whether it is measured alone or planned with the others.

For every decoder layer, streamed one at a time over the recorded calibration programs:

1. **Local error.** The layer's reference outputs come from the reference inputs (the outputs of
   the full-precision layers before it). For each group and candidate, a copy of the layer with
   only that group quantized (statistics from the same reference inputs, so AWQ/GPTQ see what
   they would see) runs the same calls; ``local = ‖y_q − y‖² / ‖y‖²`` over every output row.
2. **Gain to the output.** Layers differ in how much an error at their output survives to what
   the task consumes, so the local error is weighted by a measured gain. The perturbed outputs of
   the group's *probe* candidate (its cheapest, i.e. the largest error) on a subset of the
   programs (``gain_programs``) are carried through all later full-precision layers;
   ``gain = final / local_probe`` where ``final`` is the relative squared error on the rows the
   task consumes (the generation expert's rows of the denoising queries for t2i/t2v/edits, every
   row for x2t). This is a first-order estimate: the group's other candidates are assumed to
   perturb in a similar direction, so their final error is ``gain · local``.

The weighted error ``gain · local`` estimates each group's contribution to the final relative
squared error, which the budget selection (``quant/budget.py``) sums. Cost: per layer, one
reference pass plus one pass per (group, candidate) on all programs; the gain streams add
O(layers²·groups/2) layer passes on the ``gain_programs`` subset, whose hidden states are kept
(one stream per group of each finished layer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from lance_deploy.calibrate.record import Program
from lance_deploy.calibrate.replay import observe, run_layer
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.core.progress import bar as progress_bar
from lance_deploy.model.tree import EXPERTS, INPUT_GROUPS
from lance_deploy.quant.algorithms.stats import LayerStats
from lance_deploy.quant.apply import LinearJob, install, linear_jobs, quantize_layer
from lance_deploy.quant.plan import QuantPlan

PARTS = {"attn": ("attn_q", "attn_k", "attn_v", "attn_o"), "mlp": ("ffn_gate", "ffn_up", "ffn_down")}


@dataclass(frozen=True, order=True)
class Group:
    """One budget unit: the Linears of one part ('attn' | 'mlp') of one expert in one layer."""

    layer: int
    expert: str  # 'und' | 'gen'
    part: str  # 'attn' | 'mlp'

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"blk.{self.layer}.{self.expert}.{leaf}" for leaf in PARTS[self.part])

    @property
    def match(self) -> str:
        """Recipe glob for the group ('blk.3.gen.attn_*'). Globs never touch norms or biases."""
        return f"blk.{self.layer}.{self.expert}.{'attn' if self.part == 'attn' else 'ffn'}_*"

    @property
    def label(self) -> str:
        return f"blk.{self.layer}.{self.expert}.{self.part}"


def groups_of(shapes) -> list[Group]:
    """Every group whose Linears exist in ``shapes`` (canonical name -> shape), in layer order."""
    found = set()
    for name in shapes:
        layer, leaf = cn.layer_of(name), cn.leaf_of(name)
        for part, leaves in PARTS.items():
            if layer is not None and leaf in leaves:
                found.add(Group(layer, cn.expert_of(name), part))
    return sorted(found, key=lambda g: (g.layer, EXPERTS.index(g.expert), g.part))


@dataclass
class SensitivityTable:
    """local[g][c]: relative squared output error of layer g.layer with only group g at candidate c;
    gain[g]: final-output / layer-output error ratio of g's probe perturbation."""

    groups: list[Group]
    local: dict[Group, list[float]] = field(default_factory=dict)
    gain: dict[Group, float] = field(default_factory=dict)

    def weighted(self, g: Group, c: int) -> float:
        return self.gain[g] * self.local[g][c]

    def to_dict(self) -> dict:
        return {g.label: {"local": self.local[g], "gain": self.gain[g]} for g in self.groups}


def _group_jobs(plan: QuantPlan, g: Group) -> dict[str, LinearJob]:
    """The LinearJobs that quantize group ``g`` as ``plan`` (one candidate over all groups) says."""
    return linear_jobs(plan.entry(name) for name in g.names)


def _layer_stats(layer, cfg, programs, hidden, device, reservoir: int) -> dict:
    """Input statistics of every (expert, input group) of the layer, Hessians included (GPTQ
    candidates read them; AWQ reads the reservoir). Collected once on the reference inputs."""
    stats: dict = {}

    def make(expert: str, group: str) -> LayerStats:
        n = layer.get_submodule(INPUT_GROUPS[group].probe(expert)).weight.shape[1]
        return stats.setdefault((expert, group), LayerStats(n, cap=reservoir, hessian_dtype=torch.float32))

    handles = observe(layer, make)
    try:
        run_layer(layer, cfg, programs, hidden, device)
    finally:
        for h in handles:
            h.remove()
    return stats


def _rel_sq(ref: list[list[torch.Tensor]], test: list[list[torch.Tensor]], rows=None) -> float:
    """Σ‖test − ref‖² / Σ‖ref‖² over every call (``rows(p, c)`` selects the rows that count)."""
    num = den = 0.0
    for p, (rs, ts) in enumerate(zip(ref, test)):
        for c, (r, t) in enumerate(zip(rs, ts)):
            sel = rows(p, c) if rows else None
            if sel is not None:
                r, t = r[sel], t[sel]
            num += (t.double() - r.double()).pow(2).sum().item()
            den += r.double().pow(2).sum().item()
    return num / den if den > 0 else 0.0


def consumed_rows(programs: list[Program]):
    """rows(p, c) -> the output rows the task uses, or an empty selection.

    Generation tasks consume only the generation expert's rows of the denoising queries (the
    prefill outputs feed the KV cache, whose effect already shows in the queries); understanding
    tasks (x2t) consume every row (logits of the prompt's last token and of each decoded token).
    """

    def rows(p: int, c: int):
        prog, call = programs[p], programs[p].calls[c]
        if prog.task.startswith("x2t"):
            return slice(None)
        if call.update_cache or call.gen_rows is None:
            return torch.zeros(call.x.shape[0], dtype=torch.bool)
        return call.gen_rows

    return rows


@torch.no_grad()
def measure(cfg, programs: list[Program], layer_at, plans: list[QuantPlan], groups: list[Group], device, *,
            probe: list[int] | None = None, gain_programs: int = 1, reservoir: int = 512,
            progress: bool = False) -> SensitivityTable:
    """Measure every group under every candidate (``plans[c]``: candidate c applied to all groups).

    ``layer_at(i)`` returns decoder layer i at full precision (fp32); ``probe[gi]`` is the
    candidate index whose perturbation measures group gi's gain (default: the last candidate).
    """
    table = SensitivityTable(list(groups))
    by_layer: dict[int, list[Group]] = {}
    for g in groups:
        by_layer.setdefault(g.layer, []).append(g)
    probe = probe or [len(plans) - 1] * len(groups)
    probe_of = dict(zip(groups, probe))
    sub = programs[:max(1, gain_programs)]
    hidden = [[c.x for c in p.calls] for p in programs]
    streams: dict[Group, list[list[torch.Tensor]]] = {}  # g -> perturbed hidden on `sub`
    probe_local: dict[Group, float] = {}
    total = len(by_layer) * (1 + len(plans) * max(len(v) for v in by_layer.values()))
    with progress_bar(total, "sensitivity", unit="pass", enabled=progress) as bar:
        tick = bar.update if bar is not None else (lambda n=1: None)
        for index in range(cfg.num_hidden_layers):
            layer = layer_at(index)
            ref = run_layer(layer, cfg, programs, hidden, device)
            for g, h in streams.items():  # earlier perturbations travel through this fp layer
                streams[g] = run_layer(layer, cfg, sub, h, device)
            stats = _layer_stats(layer, cfg, programs, hidden, device, reservoir) if index in by_layer else {}
            tick(1)
            for g in by_layer.get(index, []):
                table.local[g] = []
                for c, plan in enumerate(plans):
                    q = copy.deepcopy(layer)
                    install(q, quantize_layer(q, _group_jobs(plan, g), stats))
                    out = run_layer(q, cfg, programs, hidden, device)
                    table.local[g].append(_rel_sq(ref, out))
                    if c == probe_of[g]:
                        streams[g] = out[:len(sub)]
                        probe_local[g] = _rel_sq(ref[:len(sub)], streams[g])
                    tick(1)
            hidden = ref
            del layer
    rows = consumed_rows(sub)
    final_ref = hidden[:len(sub)]
    for g in groups:
        # A group whose probe error vanishes (e.g. bf16 only) has no measurable direction: gain 1.
        table.gain[g] = _rel_sq(final_ref, streams[g], rows) / probe_local[g] if probe_local[g] > 0 else 1.0
    return table
