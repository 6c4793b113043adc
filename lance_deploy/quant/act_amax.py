"""Per-tensor activation amax of W8A8 Linear inputs, for static Q/DQ scales (``export --target tensorrt``).

Recorded at quantize time on the layer's propagation pass: after a layer is quantized, every
recorded call (prefill chunks, the kept denoising steps, both CFG branches) runs through it once
more, and a pre-hook on each W8A8 QLinear sees exactly the tensor it quantizes (x / smooth when a
runtime divisor is kept). Two choices, as ModelOpt's calibrators offer them:

* ``max``: the largest |x| seen (ModelOpt's default ``max`` calibrator);
* ``percentile``: the p-th percentile of |x| over every element seen, read from a histogram
  (ModelOpt's ``histogram`` calibrator with method ``percentile``, default p = 99.99), so that a
  few outlier elements do not stretch the scale of all the others.

The histogram has fixed-width bins (width = the first batch's max / BINS) and grows by whole
bins when a later batch exceeds its range; past MAX_BINS neighbouring bins are merged (the
width doubles), so memory stays bounded whatever the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

BINS = 2048
MAX_BINS = 1 << 16


@dataclass
class AmaxObserver:
    """Streaming max and |x| histogram of one Linear's input."""

    amax: float = 0.0
    width: float = 0.0
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten().cpu()
        if not a.numel():
            return
        top = float(a.max())
        self.amax = max(self.amax, top)
        if self.width == 0.0:
            if top == 0.0:
                return  # all zeros so far: nothing to bin yet (amax stays 0)
            self.width = top / BINS
        need = int(top / self.width) + 1
        while need > MAX_BINS:  # merge pairs of bins: same data, half the resolution
            c = self.counts
            if c.numel() % 2:
                c = torch.cat([c, c.new_zeros(1)])
            self.counts, self.width = c.view(-1, 2).sum(1), self.width * 2
            need = int(top / self.width) + 1
        if need > self.counts.numel():
            self.counts = torch.cat([self.counts, self.counts.new_zeros(need - self.counts.numel())])
        idx = (a / self.width).long().clamp_(max=self.counts.numel() - 1)
        self.counts += torch.bincount(idx, minlength=self.counts.numel()).double()

    def value(self, method: str, percentile: float) -> float:
        """The calibrated amax: the max, or the right edge of the bin holding the percentile."""
        if method == "max" or self.width == 0.0:
            return self.amax
        cdf = torch.cumsum(self.counts, 0) / self.counts.sum()
        i = int(torch.searchsorted(cdf, torch.tensor([percentile / 100.0], dtype=torch.float64)))
        return min(self.amax, (i + 1) * self.width)


def observe_w8a8_inputs(layer: nn.Module) -> tuple[dict[str, AmaxObserver], list]:
    """Pre-hooks on every W8A8 QLinear of `layer`: (module path -> observer, hook handles)."""
    from lance_deploy.formats.qlinear import QLinear

    observers, handles = {}, []
    for path, m in layer.named_modules():
        if isinstance(m, QLinear) and m.spec.activations is not None:
            obs = observers[path] = AmaxObserver()

            def hook(module, args, obs=obs):
                x = args[0]
                obs.update(x.float() / module.smooth if module.smooth is not None else x)

            handles.append(m.register_forward_pre_hook(hook))
    return observers, handles


def install_amax(layer: nn.Module, amax: dict[str, float]) -> None:
    """Give each W8A8 QLinear of `layer` its calibrated amax (module path -> value)."""
    for path, value in amax.items():
        layer.get_submodule(path).act_amax = float(value)
