"""`LayerStats`: a streaming, mergeable summary of one Linear's input activations.

Fed with batches x [n, in] (any leading dims are flattened), it keeps:

| field      | shape / dtype          | used by            | memory (in = 2048 / 11008)      |
|------------|------------------------|--------------------|---------------------------------|
| absmax     | [in] fp32              | SmoothQuant        | negligible                      |
| abs_sum    | [in] fp64              | AWQ (mean abs)     | negligible                      |
| rows, keys | [≤cap, in] fp32, [≤cap]| AWQ search, reports| cap·in·4: 4 MiB / 22 MiB at 512 |
| hessian    | [in, in] hessian_dtype | GPTQ (Σ xᵀx)       | in²·4: 16 MiB / 462 MiB (fp32)  |
| count      | rows seen              | all                |                                 |

Memory is bounded by construction, independent of how many tokens stream through: the
reservoir keeps at most `cap` rows and the Hessian is one [in, in] matrix. Calibration runs
layer by layer, so only one decoder layer's stats live at a time (q/k/v share one input, as do
gate/up, so a layer needs four of these, not seven).

The reservoir is a uniform sample without replacement: every row gets a random key from a
seeded generator and the `cap` smallest keys are kept. Merging two reservoirs keeps the
smallest keys of the union, which is again a uniform sample of all rows, so per-worker or
per-task stats merge exactly. Same seed and same batches give the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_FIELDS = ("absmax", "abs_sum", "rows", "keys", "hessian", "count")


@dataclass
class LayerStats:
    """Activation statistics of one Linear input; see the module docstring for fields."""

    in_features: int
    cap: int = 512
    hessian_dtype: torch.dtype | None = torch.float32  # None: no Hessian (AWQ/SmoothQuant only)
    seed: int = 0
    count: int = 0
    absmax: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    rows: torch.Tensor = field(init=False)
    keys: torch.Tensor = field(init=False)
    hessian: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        n = self.in_features
        self.absmax = torch.zeros(n, dtype=torch.float32)
        self.abs_sum = torch.zeros(n, dtype=torch.float64)
        self.rows = torch.zeros(0, n, dtype=torch.float32)
        self.keys = torch.zeros(0, dtype=torch.float64)
        self.hessian = None if self.hessian_dtype is None else torch.zeros(n, n, dtype=self.hessian_dtype)
        self._gen = torch.Generator().manual_seed(self.seed)

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per input channel, fp32 [in]."""
        return (self.abs_sum / max(self.count, 1)).float()

    def update(self, x: torch.Tensor) -> LayerStats:
        """Accumulate a batch x [..., in] (any device/float dtype; stats live on CPU)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"activation has {x.shape[-1]} channels, stats expect {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).float()
        if self.hessian is not None:
            # Accumulate on x's device (the GPU during calibration), then move one [in, in] block.
            self.hessian += (x.t().to(self.hessian.dtype) @ x.to(self.hessian.dtype)).cpu()
        x = x.cpu()
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(dim=0))
        self.abs_sum += a.sum(dim=0, dtype=torch.float64)
        self.count += x.shape[0]
        keys = torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64)
        self._keep(torch.cat([self.rows, x]), torch.cat([self.keys, keys]))
        return self

    def _keep(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        if keys.numel() > self.cap:
            idx = torch.topk(keys, self.cap, largest=False).indices.sort().values
            rows, keys = rows[idx], keys[idx]
        self.rows, self.keys = rows.contiguous(), keys.contiguous()

    def merge(self, other: LayerStats) -> LayerStats:
        """Fold `other` (same in_features) into self; returns self."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge stats of {other.in_features} channels into {self.in_features}")
        if (self.hessian is None) != (other.hessian is None):
            raise ValueError("cannot merge stats with and without a Hessian")
        if self.hessian is not None:
            self.hessian += other.hessian.to(self.hessian.dtype)
        self.absmax = torch.maximum(self.absmax, other.absmax)
        self.abs_sum += other.abs_sum
        self.count += other.count
        self._keep(torch.cat([self.rows, other.rows]), torch.cat([self.keys, other.keys]))
        return self

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat `{f"{prefix}.{field}": tensor}` for safetensors (no Hessian key when disabled).
        The generator state is not saved: a reloaded object resumes with fresh keys."""
        out = {f"{prefix}.count": torch.tensor(self.count, dtype=torch.int64)}
        for f in _FIELDS[:-1]:
            if (t := getattr(self, f)) is not None:
                out[f"{prefix}.{f}"] = t.contiguous()
        return out

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], cap: int = 512, seed: int = 0) -> LayerStats:
        """Inverse of `to_tensors`."""
        absmax = tensors[f"{prefix}.absmax"]
        hess = tensors.get(f"{prefix}.hessian")
        s = cls(absmax.numel(), cap=cap, hessian_dtype=None if hess is None else hess.dtype, seed=seed)
        s.absmax, s.abs_sum = absmax.float(), tensors[f"{prefix}.abs_sum"].double()
        s.rows, s.keys, s.hessian = tensors[f"{prefix}.rows"].float(), tensors[f"{prefix}.keys"].double(), hess
        s.count = int(tensors[f"{prefix}.count"])
        return s
