"""Layer streaming for the MoT backbone: host copies, two device slots per expert, prefetch.

A *group* is one expert's tensors in one layer: the und group of layer i is every parameter
and buffer of `layers[i]` that `model.tree.expert_of` gives to the und expert (projections,
QK-norms, MLP, the two layer norms; packed `QLinear` buffers included), the gen group is its
generation twin.

For each streamed group the host copy is the source of truth (pinned when the device is CUDA,
so copies can run asynchronously). On the device each expert owns two reusable slots (flat
byte buffers): the layer being computed and the one being prefetched. `before_layer(i)` makes
layer i's groups resident (waiting on the prefetch event), points the module tensors' `.data`
at views of the slot, and launches the copy of the next streamed layer on a side stream;
`after_layer(i)` records when compute is done with the slot so the next copy may overwrite it.
The tensors moved are plain bytes, so paged outputs equal resident ones bit for bit.

On CPU the "device" is the CPU: copies are synchronous, but the same slots, views and ledger
run, which is what the CPU tests exercise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lance_deploy.core.errors import LanceError
from lance_deploy.runtime.copy_engine import engine_for
from lance_deploy.model.tree import EXPERTS, expert_of

ALIGN = 256  # slot offsets: >= the CPU allocator's 64 B and CUDA's 256 B, so kernels see aligned data


class BudgetExceeded(LanceError):
    """The residency tried to put more bytes on the device than its budget."""


@dataclass
class ByteLedger:
    """Every byte the residency manager and the pager place on the device.

    `alloc` refuses (BudgetExceeded) to go over `budget`; `peak` is the high-water mark and
    `phase_peak` the high-water mark per phase (the phase is set by `ExpertResidency.enter`).
    `moved` counts host->device bytes (streamed layers and whole-component moves).
    """

    budget: int | None = None
    phase_budgets: dict = field(default_factory=dict)  # phase -> a tighter cap (the plan's weight share)
    current: int = 0
    peak: int = 0
    moved: int = 0
    phase: str = "load"
    phase_peak: dict = field(default_factory=dict)
    phase_moved: dict = field(default_factory=dict)
    _held: dict = field(default_factory=dict)

    def alloc(self, key, nbytes: int) -> None:
        if key in self._held:
            raise LanceError(f"ledger: {key!r} is already allocated")
        caps = [c for c in (self.budget, self.phase_budgets.get(self.phase)) if c is not None]
        if caps and self.current + nbytes > min(caps):
            raise BudgetExceeded(f"{self.phase}: placing {key} ({nbytes:,} B) would use {self.current + nbytes:,} B "
                                 f"of the {min(caps):,} B budget")
        self._held[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0), self.current)

    def free(self, key) -> None:
        self.current -= self._held.pop(key)

    def copied(self, nbytes: int) -> None:
        self.moved += nbytes
        self.phase_moved[self.phase] = self.phase_moved.get(self.phase, 0) + nbytes

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.phase_peak[name] = max(self.phase_peak.get(name, 0), self.current)


def module_tensors(module: nn.Module, expert: str | None = None) -> list[tuple[nn.Module, str, str]]:
    """(owner module, attribute, dotted name) of every parameter and non-None buffer under
    `module`, optionally only those of one expert (`model.tree.expert_of` of the dotted name)."""
    out = []
    for prefix, mod in module.named_modules():
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if expert is None or expert_of(name) == expert:
                out.append((mod, attr, name))
    return out


def get_tensor(mod: nn.Module, attr: str) -> torch.Tensor:
    t = mod._parameters.get(attr)
    return t if t is not None else mod._buffers[attr]


def set_data(mod: nn.Module, attr: str, data: torch.Tensor) -> None:
    """Point a parameter or buffer at `data` without creating a new Parameter (the module keeps
    its identity; `.data` assignment is what makes the swap free of autograd bookkeeping)."""
    get_tensor(mod, attr).data = data


def to_host(t: torch.Tensor, device) -> torch.Tensor:
    """A host copy of `t` to stream to `device` (pinned for CUDA), or `t` itself when it is one."""
    return engine_for(device).host_copy(t)


def place(entries, device: torch.device) -> None:
    """Point each (module, attr, host tensor) at a fresh device copy (async from pinned memory)."""
    engine = engine_for(device)
    for mod, attr, host in entries:
        set_data(mod, attr, engine.to_device(host))


def park(entries) -> None:
    """Point each (module, attr, host tensor) back at its host copy (weights are read-only)."""
    for mod, attr, host in entries:
        set_data(mod, attr, host)


def aligned(n: int) -> int:
    """Bytes `n` rounded up to the slot alignment (where the next tensor of a slot starts)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Group:
    """One streamed (layer, expert): where its tensors live in the module and on the host."""

    layer: int
    expert: str
    entries: list  # (module, attr, host tensor, byte offset in a slot)
    nbytes: int  # aligned bytes one slot needs for this group
    payload: int  # unpadded bytes copied per load

    @classmethod
    def of(cls, layer_module: nn.Module, layer: int, expert: str, device) -> Group:
        entries, off, payload = [], 0, 0
        for mod, attr, _ in module_tensors(layer_module, expert):
            host = to_host(get_tensor(mod, attr).detach(), device)
            n = host.numel() * host.element_size()
            entries.append((mod, attr, host, off))
            off += aligned(n)
            payload += n
        return cls(layer, expert, entries, off, payload)

    def park(self) -> None:
        """Point the module at the host copies (the group is not on the device)."""
        for mod, attr, host, _ in self.entries:
            set_data(mod, attr, host)


class Slot:
    """One reusable device buffer of an expert and the group it currently holds."""

    def __init__(self, nbytes: int, device: torch.device, ledger: ByteLedger, key):
        ledger.alloc(key, nbytes)
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.key, self.layer = key, None
        self.ready = None  # event: the copy into this slot finished (None without streams)
        self.done = None  # event: compute finished reading this slot (None without streams)
        self.busy = False

    def view(self, host: torch.Tensor, off: int) -> torch.Tensor:
        n = host.numel() * host.element_size()
        return self.buf[off : off + n].view(host.dtype).view(host.shape)


class LayerPager:
    """Streams the chosen (layer, expert) groups of a `Backbone` through two slots per expert.

    `stream`: {"und": set of layer indices, "gen": set of layer indices}. Tensors of other groups
    are left alone (the residency manager places them). Attach with `backbone.pager = pager`.
    """

    def __init__(self, backbone: nn.Module, stream: dict[str, set[int]], device, ledger: ByteLedger):
        self.device = torch.device(device)
        self.ledger = ledger
        self.cuda = self.device.type == "cuda"
        self.engine = engine_for(self.device)  # streams, events, pinned copies (runtime.copy_engine)
        n_layers = len(backbone.layers)
        self.groups: dict[tuple[int, str], Group] = {}
        for e in EXPERTS:
            for i in sorted(stream.get(e, ())):
                if not module_tensors(backbone.layers[i], e):
                    continue  # e.g. no gen expert loaded (x2t)
                self.groups[(i, e)] = Group.of(backbone.layers[i], i, e, self.device)
        for g in self.groups.values():
            g.park()
        # per expert: the streamed layers in order (for "next streamed layer after i")
        self.order = {e: sorted(i for i, x in self.groups if x == e) for e in EXPERTS}
        self.slots: dict[str, list[Slot]] = {}
        for e, layers in self.order.items():
            if layers:
                size = max(self.groups[(i, e)].nbytes for i in layers)
                self.slots[e] = [Slot(size, self.device, ledger, ("slot", e, s)) for s in range(2)]
        self.side = self.engine.side_stream()
        self.n_layers = n_layers
        self.use_gen = True
        self.copies = 0

    # -- the hot loop ---------------------------------------------------------------------
    def before_layer(self, i: int, use_gen: bool = True) -> None:
        """Layer i's streamed groups on the device and bound; the next streamed layer in flight.

        `use_gen` is False for a forward whose rows all go through the und expert (text chunks,
        x2t): its gen groups are then neither loaded nor prefetched.
        """
        self.use_gen = use_gen
        for e in self._experts():
            if (i, e) in self.groups:
                slot = self._ensure(i, e)
                slot.busy = True
                if slot.ready is not None:
                    self.engine.wait(slot.ready)
                for mod, attr, host, off in self.groups[(i, e)].entries:
                    set_data(mod, attr, slot.view(host, off))
            nxt = next((j for j in self.order[e] if j > i), None)
            if nxt is not None:
                self._prefetch(nxt, e)

    def after_layer(self, i: int) -> None:
        """Layer i is computed (queued, on CUDA): its slots may be overwritten after `done`."""
        for e in self._experts():
            g = self.groups.get((i, e))
            if g is None:
                continue
            slot = self._holding(i, e)
            slot.done = self.engine.record()
            slot.busy = False
            slot.layer = None  # one use per load: the next forward copies again (what the plan counts)
            g.park()

    # -- slots ----------------------------------------------------------------------------
    def _experts(self):
        return [e for e in self.slots if e == "und" or self.use_gen]

    def _holding(self, i: int, e: str) -> Slot | None:
        return next((s for s in self.slots[e] if s.layer == i), None)

    def _ensure(self, i: int, e: str) -> Slot:
        slot = self._holding(i, e)
        return slot if slot is not None else self._load(i, e)

    def _prefetch(self, j: int, e: str) -> None:
        if self._holding(j, e) is None and any(not s.busy and s.layer is None for s in self.slots[e]):
            self._load(j, e)

    def _load(self, i: int, e: str) -> Slot:
        """Copy group (i, e) into a free slot: async on the side stream (CUDA) or in place (CPU)."""
        slot = next((s for s in self.slots[e] if not s.busy and s.layer is None), None)
        if slot is None:  # both slots hold pending layers: reuse the one not being computed
            slot = next(s for s in self.slots[e] if not s.busy)
        g, engine = self.groups[(i, e)], self.engine
        with engine.using(self.side):
            if slot.done is not None:
                engine.wait(slot.done, self.side)  # compute may still read the old layer
            for _, _, host, off in g.entries:
                engine.copy_into(slot.view(host, off), host)
            slot.ready = engine.record(self.side)
        slot.layer = i
        self.copies += 1
        self.ledger.copied(g.payload)
        return slot

    def close(self) -> None:
        """Free the slots (the groups stay parked on the host)."""
        if self.side is not None:
            self.engine.wait_stream(self.side)
        for slots in self.slots.values():
            for s in slots:
                self.ledger.free(s.key)
        self.slots = {}
        for g in self.groups.values():
            g.park()

    @property
    def slot_bytes(self) -> int:
        return sum(s.buf.numel() for slots in self.slots.values() for s in slots)
