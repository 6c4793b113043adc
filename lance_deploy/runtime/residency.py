"""Phase-level residency: which components sit on the device in each span of a task.

A *unit* is what moves as a whole at a phase boundary: one expert layer (`und.3`, `gen.17`),
`norms_bridges` (final norms, time embedder, vae2llm/llm2vae), `lm_head`, `vit`, `vae_encoder`,
`vae_decoder`. The embeddings stay on the host (a lookup moves only the rows it needs).
Every unit keeps a host copy (pinned on CUDA); placing it copies to the device and is counted
in the `ByteLedger`, parking it points the module back at the host copy (no copy back: weights
are read-only). Expert layers the plan streams are handed to a `LayerPager` for the span.

Spans are the planner's phases, entered by the pipeline where each begins:

    generation   [encode_vit] -> [encode_vae] -> prefill -> denoise -> vae_decode
    x2t          encode_vit -> prefill -> text_decode

so a phase that runs only the und expert (a text prefill) leaves the gen expert on the host,
and each phase streams only what its own plan streams. In the denoise span the last k und
layers may be a compact packed copy instead of streamed (`runtime.markers`): the planner's
choice for the two marker tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lance_deploy.model.tree import twin
from lance_deploy.runtime.pager import (
    ByteLedger,
    LayerPager,
    aligned,
    get_tensor,
    module_tensors,
    park,
    place,
    to_host,
)

PLAN_EXPERT = {"und": "und_expert", "gen": "gen_expert"}
PHASE_UNITS = {"encode_vit": ("vit",), "encode_vae": ("vae_encoder",), "prefill": ("norms_bridges",),
               "denoise": ("norms_bridges",), "text_decode": ("norms_bridges", "lm_head"),
               "vae_decode": ("vae_decoder",)}


@dataclass(frozen=True)
class Span:
    """What one span keeps on the device: whole units, and per expert how many of its last
    layers stream (the planner streams the last k; experts absent from `stream` are parked).
    With `markers` ("int8" / "int4") the last k und layers are that compact copy instead."""

    name: str
    units: tuple[str, ...] = ()
    stream: dict = field(default_factory=dict)  # "und" / "gen" -> layers streamed (of L)
    markers: str | None = None


class ExpertResidency:
    """Moves units on and off the device at span boundaries and runs the span's `LayerPager`."""

    def __init__(self, lm: nn.Module, device, ledger: ByteLedger, vit: nn.Module | None = None,
                 vae: nn.Module | None = None):
        self.lm, self.device, self.ledger = lm, torch.device(device), ledger
        self.backbone = lm.language_model.model
        self.n_layers = len(self.backbone.layers)
        self.units: dict[str, list] = {}  # unit -> [(module, attr, host tensor)]
        for name, modules in self._unit_modules(lm, vit, vae).items():
            entries = []
            for m in modules:
                for mod, attr, _ in module_tensors(m[0], m[1]):
                    t = get_tensor(mod, attr)
                    if t.is_meta:  # a part the task did not load (e.g. the VAE encoder for t2i)
                        continue
                    entries.append((mod, attr, to_host(t.detach(), self.device)))
            if entries:
                self.units[name] = entries
        self.placed: set[str] = set()
        self.markers: dict = {}  # (format, first layer) -> MarkerCopy, built on first use
        self.pager: LayerPager | None = None
        self.span: Span | None = None
        self.park_all()

    def _unit_modules(self, lm, vit, vae) -> dict[str, list]:
        """unit -> [(module, expert filter or None)] (norms & bridges without the embeddings)."""
        bb, out = self.backbone, {}
        for i, layer in enumerate(bb.layers):
            out[f"und.{i}"] = [(layer, "und")]
            out[f"gen.{i}"] = [(layer, "gen")]
        out["norms_bridges"] = [(getattr(bb, n), None) for n in ("norm", twin("norm")) if hasattr(bb, n)]
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
            if not (span.markers and e == "und"):  # compact und layers neither stay nor stream
                stream[e] = set(range(self.n_layers - k, self.n_layers))
            resident += [f"{e}.{i}" for i in range(self.n_layers - k) if f"{e}.{i}" in self.units]
        return resident, stream

    def marker_layers(self, span: Span) -> range:
        k = min(int(span.stream.get("und", 0)), self.n_layers) if span.markers else 0
        return range(self.n_layers - k, self.n_layers)

    def span_bytes(self, span: Span) -> int:
        """The ledger's peak while `span` is entered: resident units + the pager's two slots per
        streamed expert (aligned like the pager lays them out)."""
        resident, stream = self.layer_units(span)
        total = sum(self.unit_bytes(u) for u in list(span.units) + resident)
        for e, layers in stream.items():
            if not layers or f"{e}.0" not in self.units:
                continue
            per = max(sum(aligned(h.numel() * h.element_size()) for _, _, h in self.units[f"{e}.{i}"])
                      for i in layers)
            total += 2 * per
        if span.markers:
            from lance_deploy.runtime.markers import layer_bytes

            total += sum(layer_bytes(self.backbone.layers[i], span.markers) for i in self.marker_layers(span))
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
        if self.marker_layers(span):
            self._marker_copy(span).attach()
        if any(stream.values()):
            self.pager = LayerPager(self.backbone, stream, self.device, self.ledger)
            self.backbone.pager = self.pager
        self.span = span

    def _marker_copy(self, span: Span):
        from lance_deploy.runtime.markers import MarkerCopy

        layers = self.marker_layers(span)
        key = (span.markers, layers.start)
        if key not in self.markers:
            self.markers[key] = MarkerCopy(self.backbone, layers, span.markers, self.device, self.ledger)
        return self.markers[key]

    def park_all(self) -> None:
        """Everything back on the host (e.g. after the last phase, or before loading another task)."""
        self._close_pager()
        for u in sorted(self.placed):
            self._park(u)
        for entries in self.units.values():
            park(entries)
        self.span = None

    def _close_pager(self) -> None:
        """Leave the current span's streaming and compact copies (the pager's slots, markers)."""
        for m in self.markers.values():
            if m.attached:
                m.detach()
        if self.pager is not None:
            self.pager.close()
            self.backbone.pager = None
            self.pager = None

    def _place(self, unit: str) -> None:
        nbytes = self.unit_bytes(unit)
        self.ledger.alloc(("unit", unit), nbytes)
        place(self.units[unit], self.device)
        self.ledger.copied(nbytes)
        self.placed.add(unit)

    def _park(self, unit: str) -> None:
        park(self.units[unit])
        self.ledger.free(("unit", unit))
        self.placed.discard(unit)


def _unit_order(u: str):
    head, _, idx = u.partition(".")
    return (head, int(idx) if idx else -1)


# -- spans from a plan ----------------------------------------------------------------------
def spans_for(plan, residency: ExpertResidency | None = None) -> list[Span]:
    """One span per phase of a `planner.Plan`: its whole units, its streamed layers and its
    marker copy. With `residency` (the real weight bytes) each span is widened until its
    weights fit next to the phase's planned KV, activations and carried tensors, and the
    ledger holds the phase to that share."""
    spans = []
    for p in plan.phases:
        stream = {short: p.streamed.get(long, 0) for short, long in PLAN_EXPERT.items() if long in p.layers}
        if p.markers:  # the span counts the compact layers where the plan would have streamed
            stream["und"] = p.marker_layers
        span = Span(p.name, PHASE_UNITS[p.name], stream, p.markers)
        if residency is not None:
            room = plan.budget - (p.total - p.weights - p.buffers)
            span = widen(span, residency, room)
            residency.ledger.phase_budgets[p.name] = room
        spans.append(span)
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
        span = Span(span.name, span.units, stream, span.markers)
    return span
