"""Record every backbone call of real task runs, as the inputs of layer-by-layer calibration.

A run of Lance is a short program of backbone calls: prefill chunks that write a KV cache
(text, ViT, clean latents), then per denoising step one query per CFG branch that reads a
cache. Recording those calls at `LanceLM.forward_chunk` captures every expert, every step
and both CFG branches without touching the task code.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lance_deploy.model.lance import LanceLM


@dataclass
class Call:
    """One backbone call: x [n, D] enters layer 0; pos [3, n]; gen_rows routes rows to the gen expert."""

    cache: int  # which KV cache of the program (0 = conditional, 1 = CFG-unconditional, ...)
    x: torch.Tensor
    pos: torch.Tensor
    causal: bool
    gen_rows: torch.Tensor | None
    update_cache: bool
    step: int | None  # denoising step of a query; None for a prefill chunk


@dataclass
class Program:
    """The calls of one calibration sample, in order."""

    task: str
    calls: list[Call] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(c.x.shape[0] for c in self.calls)


@contextmanager
def recording(lm: LanceLM, task: str, keep_step=lambda step: True, keep_cache=lambda cache: True):
    """Within the block, every `lm.forward_chunk` call is appended to the yielded Program.

    `keep_step(step)` / `keep_cache(index)` drop queries of unselected steps or CFG branches
    (prefill chunks are always kept: later queries attend to them).
    """
    program, caches, steps = Program(task), {}, [-1]
    original = lm.forward_chunk

    def wrapper(x, pos, cache, *, causal, gen_rows=None, update_cache=True):
        index = caches.setdefault(id(cache), len(caches))
        step = None
        if not update_cache:
            if index == 0:
                steps[0] += 1
            step = steps[0]
        if update_cache or (keep_step(step) and keep_cache(index)):
            rows = None if gen_rows is None else gen_rows.detach().cpu()
            program.calls.append(Call(index, x.detach().cpu(), pos.detach().cpu(), causal, rows, update_cache, step))
        return original(x, pos, cache, causal=causal, gen_rows=gen_rows, update_cache=update_cache)

    lm.forward_chunk = wrapper
    try:
        yield program
    finally:
        del lm.forward_chunk  # back to the class method


def stratified_steps(total: int, n: int | None) -> set[int]:
    """n evenly spaced step indices of `total` (all steps when n is None or >= total)."""
    if n is None or n >= total:
        return set(range(total))
    return {int(round(i)) for i in torch.linspace(0, total - 1, n).tolist()}
