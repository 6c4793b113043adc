"""Build a module on the meta device, then let a loader stream its real tensors in.

A meta build allocates nothing and runs no random init, so a loader that installs one tensor
at a time (``checkpoint.loader.load_into``, the artifact loader, ``load_vae``) never holds a
second copy of the weights. Every model loader builds through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def build_on_meta(make: Callable[[], M], fill: Callable[[M], object]) -> M:
    """``make()`` built on the meta device, filled in place by ``fill(module)``, in eval mode."""
    with torch.device("meta"):
        module = make()
    fill(module)
    return module.eval()
