"""Plant Qwen-style activation outliers in a random checkpoint without changing its function.

Real Qwen-family models have a few hidden channels whose normed activations are tens of
times larger than the rest; that is what makes W8A8 and int4 hard and what SmoothQuant and
AWQ exist for. Random test weights have none, so algorithms look equally good on them.

The transform is an exact reparameterisation. Every RMSNorm here feeds only Linears:

    input_layernorm(_moe_gen)          -> self_attn.{q,k,v}_proj(_moe_gen)
    post_attention_layernorm(_moe_gen) -> mlp(_moe_gen).{gate,up}_proj
    model.norm                         -> lm_head
    model.norm_moe_gen                 -> llm2vae

Multiplying channel c of the norm weight by ``factor`` and dividing input column c of each
reader by the same factor leaves ``W @ (g * x)`` unchanged (up to float rounding), while the
norm's output, the input every quantizer sees, gets the outlier channels. Biases act on the
output side and are untouched.

``OutlierPlan.apply(key, tensor)`` is a pure function of the key and tensor: the channels of a
norm are derived from (seed, tag, norm key) alone, so the writer can apply it tensor by
tensor while streaming (``--full`` stays at one tensor of RAM) and in any key order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from lance_deploy.checkpoint import canonical as cn
from lance_deploy.config import LLMConfig
from lance_deploy.core.errors import CheckpointError, LanceUsageError
from lance_deploy.model.tree import FOLD_GROUPS, fold_group_of

DEFAULT_FACTOR = 30.0
RECORD_FILE = "outliers.json"
RECORD_FORMAT = "lance-deploy-outliers/1"

# In canonical names: the layer norms are those of the fold groups (``model/tree.py``).
_FINAL_READERS = {"lm_head": "out_norm.und", "llm2vae": "out_norm.gen"}
_LAYER_NORMS = frozenset(g.norm for g in FOLD_GROUPS)


def _canonical(key: str) -> str | None:
    try:
        return cn.to_canonical(key)
    except CheckpointError:
        return None


def norm_read_by(key: str) -> str | None:
    """The RMSNorm weight whose output the Linear weight ``key`` reads, or None for any other key."""
    name = _canonical(key)
    if name is None:
        return None
    group = fold_group_of(cn.leaf_of(name))
    if group is not None:
        return cn.to_release(f"blk.{cn.layer_of(name)}.{cn.expert_of(name)}.{group.norm}")
    return cn.to_release(_FINAL_READERS[name]) if name in _FINAL_READERS else None


def readers_by_norm(keys) -> dict[str, list[str]]:
    """Norm weight key -> the reader weight keys among ``keys`` (sorted), for every planted norm."""
    out: dict[str, list[str]] = {}
    for k in sorted(keys):
        norm = norm_read_by(k)
        if norm is not None:
            out.setdefault(norm, []).append(k)
    return out


@lru_cache(maxsize=4096)
def _pick(seed: int, tag: str, norm_key: str, hidden: int, count: int) -> tuple[int, ...]:
    # sha256 rather than hash(): stable across processes and Python versions (PYTHONHASHSEED).
    digest = hashlib.sha256(f"outliers/{seed}/{tag}/{norm_key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return tuple(sorted(torch.randperm(hidden, generator=gen)[:count].tolist()))


@dataclass(frozen=True)
class OutlierPlan:
    """Which channels of which norms get scaled, for one model file.

    ``tag`` separates the files of one checkpoint (the writer passes the variant, so
    Lance_3B and Lance_3B_Video get different channels, as they get different weights).
    A channel set is chosen independently for every norm (per layer and per expert).
    """

    hidden: int
    count: int
    factor: float = DEFAULT_FACTOR
    seed: int = 0
    tag: str = ""

    def __post_init__(self):
        if not 0 < self.count <= self.hidden:
            raise LanceUsageError(f"outlier channel count must be in 1..{self.hidden}, got {self.count}")
        if not self.factor > 1.0:
            raise LanceUsageError(f"outlier factor must be > 1, got {self.factor}")

    @classmethod
    def for_config(cls, cfg: LLMConfig, count: int, factor: float = DEFAULT_FACTOR, seed: int = 0,
                   tag: str = "") -> OutlierPlan:
        return cls(cfg.hidden_size, count, factor, seed, tag)

    def channels(self, norm_key: str) -> tuple[int, ...]:
        """The planted channels of one norm weight (sorted), deterministic in (seed, tag, key)."""
        return _pick(self.seed, self.tag, norm_key, self.hidden, self.count)

    def apply(self, key: str, tensor: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The value to store for ``key``: scaled norm channels, divided reader columns, else as is.

        Apply before any cast to a storage dtype, so the division happens in float32.
        ``inplace`` lets a writer that owns ``tensor`` skip the copy: at full size
        ``lm_head`` is 1.2 GB, and a copy would double the generator's peak RAM.
        """
        reader_of = norm_read_by(key)
        if reader_of is None and not _is_planted_norm(key):
            return tensor
        t = tensor if inplace else tensor.clone()
        if reader_of is not None:
            t[:, list(self.channels(reader_of))] /= self.factor
        else:
            t[list(self.channels(key))] *= self.factor
        return t

    def record(self, keys) -> dict:
        """The ``outliers.json`` content for a file holding ``keys``: what was planted where."""
        norms = readers_by_norm(keys)
        return {"format": RECORD_FORMAT, "factor": self.factor, "seed": self.seed, "tag": self.tag,
                "channels_per_norm": self.count, "hidden_size": self.hidden,
                "norms": {n: {"channels": list(self.channels(n)), "readers": r} for n, r in sorted(norms.items())}}


def _is_planted_norm(key: str) -> bool:
    name = _canonical(key)
    return name is not None and (cn.leaf_of(name) in _LAYER_NORMS or name in _FINAL_READERS.values())


def write_record(model_dir: str | Path, plan: OutlierPlan, keys) -> Path:
    """Write ``outliers.json`` beside the model's ``model.safetensors``."""
    path = Path(model_dir) / RECORD_FILE
    path.write_text(json.dumps(plan.record(keys), indent=1) + "\n")
    return path
