"""Phase-level residency: which components sit on the device in each span of a task.

A *unit* is what moves as a whole at a phase boundary: one expert layer (`und.3`, `gen.17`),
`norms_bridges` (final norms, time embedder, vae2llm/llm2vae), `lm_head`, `vit`, `vae_encoder`,
`vae_decoder`. The embeddings stay on the host (a lookup moves only the rows it needs).
Every unit keeps a host copy (pinned on CUDA); placing it copies to the device and is counted
in the `ByteLedger`, parking it points the module back at the host copy (no copy back: weights
are read-only). Expert layers the plan streams are handed to a `LayerPager` for the span.

Spans follow the planner's phases where the pipeline can see the boundary:

    generation   encode (ViT + VAE encoder, edits / i2v) -> llm (prefill + denoise) -> vae_decode
    x2t          encode (ViT) -> llm (prefill + text_decode, with lm_head)

Prefill and denoise share one span because their boundary sits inside `pipeline.denoise()`;
the span streams, per expert, the most layers any of its phases streams, then more if the
union of their resident sets would not fit next to the phases' KV caches and activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lance_deploy.runtime.pager import (
    ByteLedger,
    LayerPager,
    get_tensor,
    module_tensors,
    set_data,
    to_host,
)

PLAN_EXPERT = {"und": "und_expert", "gen": "gen_expert"}
LLM_PHASES = ("prefill", "denoise", "text_decode")


@dataclass(frozen=True)
class Span:
    """What one span keeps on the device: whole units, and per expert how many of its last
    layers stream (the planner streams the last k; experts absent from `stream` are parked)."""

    name: str
    units: tuple[str, ...] = ()
    stream: dict = field(default_factory=dict)  # "und" / "gen" -> layers streamed (of L)


class ExpertResidency:
    """Moves units on and off the device at span boundaries and runs the span's `LayerPager`."""

    def __init__(self, lm: nn.Module, device, ledger: ByteLedger, vit: nn.Module | None = None,
                 vae: nn.Module | None = None):
        self.lm, self.device, self.ledger = lm, torch.device(device), ledger
        self.backbone = lm.language_model.model
        self.n_layers = len(self.backbone.layers)
        pin = self.device.type == "cuda"
        self.units: dict[str, list] = {}  # unit -> [(module, attr, host tensor)]
        for name, modules in self._unit_modules(lm, vit, vae).items():
            entries = []
            for m in modules:
                for mod, attr, _ in module_tensors(m[0], m[1]):
                    t = get_tensor(mod, attr)
                    if t.is_meta:  # a part the task did not load (e.g. the VAE encoder for t2i)
                        continue
                    entries.append((mod, attr, to_host(t.detach(), pin)))
            if entries:
                self.units[name] = entries
        self.placed: set[str] = set()
        self.pager: LayerPager | None = None
        self.span: Span | None = None
        self.park_all()

    def _unit_modules(self, lm, vit, vae) -> dict[str, list]:
        """unit -> [(module, expert filter or None)] (norms & bridges without the embeddings)."""
        bb, out = self.backbone, {}
        for i, layer in enumerate(bb.layers):
            out[f"und.{i}"] = [(layer, "und")]
            out[f"gen.{i}"] = [(layer, "gen")]
        out["norms_bridges"] = [(getattr(bb, n), None) for n in ("norm", "norm_moe_gen") if hasattr(bb, n)]
        out["norms_bridges"] += [(getattr(lm, n), None) for n in ("time_embedder", "vae2llm", "llm2vae")
                                 if hasattr(lm, n)]
        if hasattr(lm.language_model, "lm_head"):
            out["lm_head"] = [(lm.language_model.lm_head, None)]
        if vit is not None:
            out["vit"] = [(vit, None)]
        if vae is not None:
            out["vae_encoder"] = [(vae.encoder, None), (vae.conv1, None)]
            out["vae_decoder"] = [(vae.conv2, None), (vae.decoder, None)]
        return out

    # -- bytes ------------------------------------------------------------------------------
    def unit_bytes(self, unit: str) -> int:
        return sum(h.numel() * h.element_size() for _, _, h in self.units.get(unit, ()))

    def layer_units(self, span: Span) -> tuple[list[str], dict[str, set[int]]]:
        """(resident layer units, streamed layer indices per expert) of `span`."""
        resident, stream = [], {}
        for e, k in span.stream.items():
            k = min(int(k), self.n_layers)
            stream[e] = set(range(self.n_layers - k, self.n_layers))
            resident += [f"{e}.{i}" for i in range(self.n_layers - k) if f"{e}.{i}" in self.units]
        return resident, stream

    def span_bytes(self, span: Span) -> int:
        """The ledger's peak while `span` is entered: resident units + the pager's two slots per
        streamed expert (aligned like the pager lays them out)."""
        from lance_deploy.runtime.pager import _aligned

        resident, stream = self.layer_units(span)
        total = sum(self.unit_bytes(u) for u in list(span.units) + resident)
        for e, layers in stream.items():
            if not layers or f"{e}.0" not in self.units:
                continue
            per = max(sum(_aligned(h.numel() * h.element_size()) for _, _, h in self.units[f"{e}.{i}"])
                      for i in layers)
            total += 2 * per
        return total

    # -- moves ------------------------------------------------------------------------------
    def enter(self, span: Span) -> None:
        """Park what `span` does not keep, place what it does, and attach its pager."""
        self._close_pager()
        resident, stream = self.layer_units(span)
        want = {u for u in list(span.units) + resident if u in self.units}
        for u in sorted(self.placed - want):  # free first: the peak is the larger side, not the sum
            self._park(u)
        self.ledger.set_phase(span.name)
        for u in sorted(want - self.placed, key=_unit_order):
            self._place(u)
        if any(stream.values()):
            self.pager = LayerPager(self.backbone, stream, self.device, self.ledger)
            self.backbone.pager = self.pager
        self.span = span

    def park_all(self) -> None:
        """Everything back on the host (e.g. after the last phase, or before loading another task)."""
        self._close_pager()
        for u in sorted(self.placed):
            self._park(u)
        for entries in self.units.values():
            for mod, attr, host in entries:
                set_data(mod, attr, host)
        self.span = None

    def _close_pager(self) -> None:
        if self.pager is not None:
            self.pager.close()
            self.backbone.pager = None
            self.pager = None

    def _place(self, unit: str) -> None:
        nbytes = self.unit_bytes(unit)
        self.ledger.alloc(("unit", unit), nbytes)
        for mod, attr, host in self.units[unit]:
            dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            dev.copy_(host, non_blocking=host.is_pinned())
            set_data(mod, attr, dev)
        self.ledger.copied(nbytes)
        self.placed.add(unit)

    def _park(self, unit: str) -> None:
        for mod, attr, host in self.units[unit]:
            set_data(mod, attr, host)
        self.ledger.free(("unit", unit))
        self.placed.discard(unit)


def _unit_order(u: str):
    head, _, idx = u.partition(".")
    return (head, int(idx) if idx else -1)


# -- spans from a plan ----------------------------------------------------------------------
def spans_for(task_spec, plan, residency: ExpertResidency | None = None) -> list[Span]:
    """The spans of a task from a `planner.Plan` (phases by name), widened so that each span's
    weights fit next to the non-weight bytes of the phases it merges (when `residency` is
    given to measure the real weight bytes)."""
    phases = {p.name: p for p in plan.phases}
    spans = []
    enc = tuple(u for u in ("vit", "vae_encoder") if getattr(task_spec, u))
    if enc:
        spans.append(Span("encode", enc))
    llm = [phases[n] for n in LLM_PHASES if n in phases]
    units = ("norms_bridges",) + (("lm_head",) if any(p.name == "text_decode" for p in llm) else ())
    stream = {}
    for short, long in PLAN_EXPERT.items():
        if any(long in p.streamed for p in llm):
            stream[short] = max(p.streamed.get(long, 0) for p in llm)
    span = Span("llm", units, stream)
    if residency is not None:
        # the tightest merged phase decides: its KV, activations and carried tensors stay as planned
        room = plan.budget - max(p.total - p.weights - p.buffers for p in llm)
        span = widen(span, residency, room)
        residency.ledger.phase_budgets["llm"] = room  # the ledger holds the span to the plan's share
    spans.append(span)
    if any(p.name == "vae_decode" for p in plan.phases):
        spans.append(Span("vae_decode", ("vae_decoder",)))
    return spans


def widen(span: Span, residency: ExpertResidency, room: int) -> Span:
    """Stream one more layer at a time (und first: it carries only the 2 marker rows while
    denoising) until the span's weights fit `room` or every layer streams."""
    L = residency.n_layers
    while residency.span_bytes(span) > room:
        stream = dict(span.stream)
        e = next((e for e in ("und", "gen") if e in stream and stream[e] < L), None)
        if e is None:
            break
        stream[e] += 1
        span = Span(span.name, span.units, stream)
    return span
