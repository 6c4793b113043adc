"""A compact resident copy of understanding-expert layers for the denoising marker tokens.

While denoising, the query is `[vision_start, latents..., vision_end]`: the latent rows go
through the generation expert, the two marker rows through the understanding expert, in every
layer and at every step. When the planner cannot keep the und expert resident, the alternative
to streaming its layers per forward (5.5 GB per forward at bf16, for 2 rows) is a resident copy
of those layers packed in a smaller format (`int8` per output channel: half of bf16; `int4`
groups of 128: about a quarter). Only the marker rows see it, so the latents are approximated
through attention to two tokens; `docs/benchmarks.md` has the measured cost in quality.

The copy replaces each und leaf module (the 7 Linears by `QLinear`, the 4 norms by device
copies) of the chosen layers while the denoise span is entered, and puts the originals back
when it is left; the host copies of the originals are untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lance_deploy.formats import FormatError, FormatSpec, effective_weight, nbytes, quantize_rtn
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.model.tree import expert_of
from lance_deploy.runtime.pager import ByteLedger, get_tensor, module_tensors, park, place, set_data, to_host

FORMATS = {"int8": FormatSpec("int8"), "int4": FormatSpec("int4", group_size=128)}
"""The compact formats (the same specs as the planner's hypothetical recipes of `weights.py`)."""


def und_leaves(layer: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every und module of `layer` that owns tensors directly."""
    out = []
    for name, mod in layer.named_modules():
        if not name or expert_of(name) == "gen":
            continue
        if any(t is not None for t in list(mod._parameters.values()) + list(mod._buffers.values())):
            parent_name, _, attr = name.rpartition(".")
            out.append((layer.get_submodule(parent_name) if parent_name else layer, attr, mod))
    return out


def _float_weight(mod: nn.Module) -> torch.Tensor:
    return mod.weight.detach().float() if isinstance(mod, nn.Linear) else effective_weight(mod.packed)


def compact(mod: nn.Module, spec: FormatSpec) -> nn.Module:
    """`mod` for the marker rows, on the host: a Linear (or a wider QLinear) packed in `spec`;
    any other module, or a weight the format cannot take (tiny widths), copied as it is."""
    if isinstance(mod, (nn.Linear, QLinear)):
        bias = mod.bias.detach().cpu() if mod.bias is not None else None
        try:
            packed = quantize_rtn(_float_weight(mod).cpu(), spec)
        except FormatError:
            packed = None
        if packed is not None and packed.nbytes < _weight_bytes(mod):
            return QLinear(packed, bias)
    out = copy.deepcopy(mod)
    # host copies are already on the CPU; .cpu() would re-wrap every tensor (and cannot swap a fake one)
    return out if all(t.device.type == "cpu" for t in out.state_dict().values()) else out.cpu()


def module_bytes(mod: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))


def _weight_bytes(mod: nn.Module) -> int:
    """A Linear's or QLinear's bytes without its bias (what packing can shrink)."""
    return module_bytes(mod) - (0 if mod.bias is None else mod.bias.numel() * mod.bias.element_size())


def compact_bytes(mod: nn.Module, spec: FormatSpec) -> int:
    """What `compact(mod, spec)` will hold, from shapes alone (no quantization run)."""
    if isinstance(mod, (nn.Linear, QLinear)):
        shape = tuple(mod.weight.shape) if isinstance(mod, nn.Linear) else (mod.out_features, mod.in_features)
        try:
            packed = nbytes(shape, spec)
        except FormatError:
            packed = None
        if packed is not None and packed < _weight_bytes(mod):
            return packed + (0 if mod.bias is None else mod.bias.numel() * mod.bias.element_size())
    return module_bytes(mod)


def layer_bytes(layer: nn.Module, fmt: str) -> int:
    """Bytes of one und layer's compact copy."""
    return sum(compact_bytes(mod, FORMATS[fmt]) for _, _, mod in und_leaves(layer))


class MarkerCopy:
    """Packed copies of the und layers `layers` of `backbone`, built once on the host (pinned on
    CUDA) and placed on `device` only while attached, counted in the ledger like any unit."""

    def __init__(self, backbone: nn.Module, layers, fmt: str, device, ledger: ByteLedger):
        self.fmt, self.ledger, self.device = fmt, ledger, torch.device(device)
        spec = FORMATS[fmt]
        self.swaps = []  # (parent, attr, original, compact)
        with torch.no_grad():
            for i in sorted(layers):
                for parent, attr, mod in und_leaves(backbone.layers[i]):
                    self.swaps.append((parent, attr, mod, compact(mod, spec)))
        self.entries = []  # (module, attr, host tensor)
        for _, _, _, small in self.swaps:
            for mod, attr, _ in module_tensors(small):
                host = to_host(get_tensor(mod, attr).detach(), self.device)
                set_data(mod, attr, host)
                self.entries.append((mod, attr, host))
        self.nbytes = sum(h.numel() * h.element_size() for _, _, h in self.entries)
        self.attached = False

    def attach(self) -> None:
        """Copy the packed layers to the device and route the und modules through them."""
        self.ledger.alloc(("markers", self.fmt), self.nbytes)
        place(self.entries, self.device)
        self.ledger.copied(self.nbytes)
        for parent, attr, _, small in self.swaps:
            setattr(parent, attr, small)
        self.attached = True

    def detach(self) -> None:
        for parent, attr, original, _ in self.swaps:
            setattr(parent, attr, original)
        park(self.entries)
        self.ledger.free(("markers", self.fmt))
        self.attached = False
