"""The residency plan: per phase, what is resident, what streams per layer, and the predicted peak.

Per phase the planner keeps whole the components the phase runs (ViT, a VAE part, lm_head,
norms + bridges) and chooses, for each expert the phase runs, how many of its layers stream
from pinned host memory (`k` of 36: current + prefetch buffers on the GPU, the other 36 - k
resident). It picks the fit with the least streamed bytes (a streamed layer costs one copy per
forward that touches it), so the understanding expert stays resident during denoising when it
fits and otherwise streams per step for the 2 marker tokens. Embeddings stay on the host.

Predicted peak of a phase (what `torch.cuda.max_memory_reserved` should show):

    resident weights + 2 x streamed-layer buffers + KV + activations + VAE + carried tensors
    + FRAGMENTATION x (activations + VAE)      # caching-allocator slack on transient blocks
    + WORKSPACE                                # cuBLAS/cuDNN workspaces
    (+ one dequantized expert weight for a quantized recipe)

The two marker tokens of the denoising query need the und expert at every step. When it does
not fit resident, the planner weighs streaming its last k layers per forward against a resident
compact copy of them (`int8`: half of bf16, `int4`: about a quarter; see `runtime.markers`):
streaming is exact, and free while each layer's copy hides behind the previous layer's compute,
so `auto` keeps it unless its estimated slowdown, max(copy, compute) / compute per forward at
`PCIE_BYTES_PER_S` and `DEVICE_FLOPS`, exceeds `MARKER_TOLERANCE`.

The budget is what PyTorch may allocate: the CUDA context (~0.3-0.6 GB) is outside it; the
default budget (free device memory minus 1 GiB) already excludes it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from lance_deploy.planning.phases import PhaseDemand
from lance_deploy.planning.weights import EXPERTS, WeightInventory

FRAGMENTATION = 0.10
WORKSPACE = 64 << 20
STREAM_BUFFERS = 2  # the layer being computed + the one being prefetched
PCIE_BYTES_PER_S = 25e9  # pinned host->device copies, PCIe 4.0 x16 (assumption for the time estimate)
DEVICE_FLOPS = 60e12  # bf16 GEMM throughput an RTX 4090 sustains with fp32 accumulation (assumption)
MARKER_TOLERANCE = 1.10  # the largest estimated denoise slowdown `auto` accepts from streaming
MARKER_POLICIES = ("auto", "stream", "int8", "int4")


@dataclass(frozen=True)
class PhasePlan:
    """One phase's ledger: where every byte lives at the phase's peak."""

    name: str
    resident: dict[str, int]  # component -> bytes resident on the GPU
    streamed: dict[str, int]  # expert -> layers streamed (of `layers[expert]`)
    layers: dict[str, int]
    weights: int
    buffers: int
    kv: int
    activations: int
    vae: int
    carried: int
    overhead: int
    streamed_bytes: int  # host->GPU bytes over the whole phase
    forwards: int
    markers: str | None = None  # compact format of the und layers the marker rows use instead
    marker_layers: int = 0  # the last `marker_layers` und layers are that compact copy
    flops: int = 0  # one forward (time estimates)

    @property
    def total(self) -> int:
        return (self.weights + self.buffers + self.kv + self.activations + self.vae + self.carried
                + self.overhead)

    @property
    def transfer_s(self) -> float:
        return self.streamed_bytes / PCIE_BYTES_PER_S

    @property
    def slowdown(self) -> float | None:
        """Estimated time of one forward over the all-resident one: the copies of a forward
        overlap its compute (prefetch), so max(copy, compute) / compute; None without flops."""
        if not self.flops or not self.forwards:
            return None
        compute = self.flops / DEVICE_FLOPS
        return max(compute, self.transfer_s / self.forwards) / compute

    def describe(self) -> str:
        """'gen_expert, norms_bridges resident; und_expert 36/36 layers streamed'."""
        parts = []
        for c in self.resident:
            k = self.streamed.get(c, 0) + (self.marker_layers if c == "und_expert" else 0)
            parts.append(f"{c} {self.layers[c] - k}/{self.layers[c]}" if k and c in self.layers else c)
        text = ", ".join(parts) + " resident" if parts else "nothing resident"
        streamed = [f"{e} {k}/{self.layers[e]} layers" for e, k in self.streamed.items() if k]
        text += "; streamed: " + ", ".join(streamed) if streamed else ""
        if self.markers:
            text += f"; markers: und_expert {self.marker_layers}/{self.layers['und_expert']} layers as {self.markers}"
        return text


@dataclass
class Plan:
    """A residency plan for one request under one budget."""

    budget: int
    phases: list[PhasePlan]
    phase_min: dict[str, int]  # per phase: its total with every expert layer streamed

    @property
    def min_budget(self) -> int:
        """The smallest budget every phase fits (all expert layers streamed)."""
        return max(self.phase_min.values())

    @property
    def fits(self) -> bool:
        return all(p.total <= self.budget for p in self.phases)

    @property
    def peak(self) -> PhasePlan:
        return max(self.phases, key=lambda p: p.total)

    def marker_mode(self) -> str | None:
        """How the 2 marker tokens reach the understanding expert while denoising."""
        d = next((p for p in self.phases if p.name == "denoise"), None)
        if d is None:
            return None
        if d.total > self.budget:
            return "neither resident nor streamed und_expert fits"
        L, k = d.layers["und_expert"], d.streamed.get("und_expert", 0)
        if d.markers:
            return f"und_expert {d.marker_layers}/{L} layers as a resident {d.markers} copy for the marker rows"
        if k == 0:
            return "und_expert resident"
        est = f", est. {d.slowdown:.2f}x per step" if d.slowdown else ""
        return f"und_expert streamed per forward ({k}/{L} layers{est})"


def _phase_plan(d: PhaseDemand, inv: WeightInventory, ks: dict[str, int], extra: int,
                markers: str | None = None, km: int = 0) -> PhasePlan:
    """The phase with the last ks[e] layers of each expert streamed and, with `markers`, the last
    `km` und layers as that compact copy (ks['und_expert'] is then 0)."""
    resident = {c: inv.components[c] for c in d.fixed if inv.components.get(c)}
    buffers = streamed_bytes = 0
    layers = {}
    for e, k in ks.items():
        per = inv.layers[e]
        layers[e] = len(per)
        kept = sum(per[: len(per) - k - (km if e == "und_expert" else 0)])
        if kept:
            resident[e] = kept
        if k:
            buffers += STREAM_BUFFERS * inv.layer_bytes(e)
            streamed_bytes += sum(per[len(per) - k:]) * d.experts[e]
    if markers and km:
        per = inv.compact[markers]
        resident[f"und_markers_{markers}"] = sum(per[len(per) - km:])
    overhead = int(FRAGMENTATION * (d.activations + d.vae)) + WORKSPACE + (extra if d.experts else 0)
    return PhasePlan(d.name, resident, dict(ks), layers, sum(resident.values()), buffers, d.kv, d.activations,
                     d.vae, d.carried, overhead, streamed_bytes, d.forwards, markers if km else None, km, d.flops)


def plan_phase(d: PhaseDemand, inv: WeightInventory, budget: int, extra: int = 0,
               markers: str = "auto") -> tuple[PhasePlan, int]:
    """The least-streaming plan of one phase that fits `budget` (or the leanest one if none
    fits), and the phase's minimum total (every expert layer streamed).

    Exhaustive over (k_und, k_gen) in 0..36 x 0..36, which is cheap in closed form: the total
    falls by one resident layer and rises by the buffers once an expert streams at all. Ties on
    streamed bytes go to fewer streamed layers, then to streaming the expert with fewer forwards
    (the gen expert in an edit's prefill), then the und expert (it only carries 2 rows).
    """
    experts = [e for e in EXPERTS if e in d.experts and inv.num_layers(e)]
    base = _phase_plan(d, inv, {e: 0 for e in experts}, extra).total
    cost = {}  # expert -> [(memory saved, bytes streamed over the phase)] for k = 0..L
    for e in experts:
        per = inv.layers[e]
        rows = []
        for k in range(len(per) + 1):
            gone = sum(per[len(per) - k:])
            rows.append((gone - (STREAM_BUFFERS * inv.layer_bytes(e) if k else 0), gone * d.experts[e]))
        cost[e] = rows
    rank = sorted(experts, key=lambda e: (d.experts[e], e != "und_expert"))
    best = None
    for combo in itertools.product(*(range(inv.num_layers(e) + 1) for e in experts)):
        ks = dict(zip(experts, combo))
        if base - sum(cost[e][k][0] for e, k in ks.items()) > budget:
            continue
        key = (sum(cost[e][k][1] for e, k in ks.items()), sum(combo), tuple(-ks[e] for e in rank))
        if best is None or key < best[0]:
            best = (key, ks)
    leanest = _phase_plan(d, inv, {e: inv.num_layers(e) for e in experts}, extra)
    chosen = _phase_plan(d, inv, best[1], extra) if best else leanest
    if d.name == "denoise" and chosen.streamed.get("und_expert") and markers != "stream":
        chosen = _marker_choice(d, inv, budget, extra, chosen, markers)
    return chosen, leanest.total


def _compact_plan(d: PhaseDemand, inv: WeightInventory, budget: int, extra: int, fmt: str) -> PhasePlan | None:
    """The fitting plan with the und expert's last km layers as the `fmt` copy (no und streamed)
    that streams the fewest gen bytes, then has the fewest compact layers; None if none fits."""
    L, G = inv.num_layers("und_expert"), inv.num_layers("gen_expert")
    if fmt not in inv.compact or sum(inv.compact[fmt]) >= inv.components["und_expert"]:
        return None  # e.g. an artifact already stored at int8: an int8 copy would save nothing
    for kg in range(G + 1):
        for km in range(1, L + 1):
            p = _phase_plan(d, inv, {"und_expert": 0, "gen_expert": kg} if G else {"und_expert": 0}, extra, fmt, km)
            if p.total <= budget:
                return p
    return None


def _marker_choice(d, inv, budget, extra, streamed: PhasePlan, policy: str) -> PhasePlan:
    """`streamed` (exact) unless the policy asks for a compact copy, or `auto` finds streaming
    slower than MARKER_TOLERANCE and a compact copy (int8 first) that fits and is faster."""
    if policy in ("int8", "int4"):
        return _compact_plan(d, inv, budget, extra, policy) or streamed
    if (streamed.slowdown or 1.0) <= MARKER_TOLERANCE:
        return streamed
    for fmt in ("int8", "int4"):
        p = _compact_plan(d, inv, budget, extra, fmt)
        if p is not None and (p.slowdown or 1.0) < streamed.slowdown:
            return p
    return streamed


def plan(demands: list[PhaseDemand], inv: WeightInventory, budget: int, extra: int = 0,
         markers: str = "auto") -> Plan:
    """Plan every phase of a request independently (the manager swaps at phase boundaries);
    `markers` is the policy for the denoising marker rows (MARKER_POLICIES)."""
    phases, mins = [], {}
    for d in demands:
        p, mins[d.name] = plan_phase(d, inv, budget, extra, markers)
        phases.append(p)
    return Plan(budget, phases, mins)
