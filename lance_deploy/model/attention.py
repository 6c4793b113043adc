"""Split-mode attention over a KV cache, with torch SDPA.

Lance attends in splits: a text split is causal, a vision split is bidirectional,
and a noisy target split is a query that nothing else may see (so it is never
written to the cache). Queries see the whole cached prefix plus their own split;
causal splits align bottom-right, as flash-attn varlen does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Per-layer keys/values of the prefix, [L_cached, kv_heads, head_dim] each."""

    num_layers: int
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else int(k.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache | None,
    layer: int,
    *,
    causal: bool,
    update_cache: bool,
) -> torch.Tensor:
    """q [n, Hq, d], k/v [n, Hkv, d] for the new split -> [n, Hq*d].

    The split sees every cached key plus its own keys (all of them, or causally).
    """
    if cache is not None and cache.keys[layer] is not None:
        k_all = torch.cat([cache.keys[layer], k], dim=0)
        v_all = torch.cat([cache.values[layer], v], dim=0)
    else:
        k_all, v_all = k, v
    if update_cache and cache is not None:
        cache.keys[layer], cache.values[layer] = k_all, v_all
    n, prefix = q.shape[0], k_all.shape[0] - q.shape[0]
    mask = None
    if causal and n > 1:
        # bottom-right causal: query i sees keys [0, prefix + i]
        mask = torch.ones(n, n + prefix, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, Hq, n, d]
        k_all.transpose(0, 1)[None],
        v_all.transpose(0, 1)[None],
        attn_mask=mask,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1).reshape(n, -1)  # [n, Hq*d]
