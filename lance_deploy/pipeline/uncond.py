"""The text-unconditional (CFG) branch of a generation sequence.

Text-CFG drops the caption tokens (modality 0). Upstream's default KV-cache path
and its non-KV path disagree on positions (0.6-4.5 % rel-L2 on final latents);
the goldens follow the KV path, which this module describes exactly.

This is the branch without a negative prompt (upstream's only one). A negative prompt replaces
it by a whole sequence, `GenSequence.negative`: the same template with the negative text as the
caption, prefilled and queried at its own positions like the conditional sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lance_deploy.pipeline.layout import Layout, split_starts
from lance_deploy.pipeline.positions import MOD_CAPTION


@dataclass
class UncondBranch:
    """The text-unconditional (CFG) branch: the sequence without the caption split.

    Upstream's KV-cache path (the default, which the goldens follow) does NOT run
    `token_ids`/`rope_pos` below as one sequence. It prefills a second cache with
    the conditional splits listed in `prefix_splits` (every split before the target
    whose first token is not caption) **at their conditional positions**, then runs
    the target-split query at `target_pos`, i.e. `rope_pos[:, prefix_len : prefix_len
    + n_target_split]` of the caption-free sequence. `rope_pos_used` is that exact
    concatenation; after the caption the cached template tokens therefore sit at
    positions shifted by the caption length relative to the query.
    """

    token_ids: torch.Tensor  # [Lu] int64, token_ids with the caption tokens removed
    keep: torch.Tensor  # [L] bool, token_modality != 0
    split_lens: list[int]  # splits of the caption-free sequence (non-KV path)
    attn_modes: list[str]
    rope_pos: torch.Tensor  # [3, Lu] int64, get_rope_index on token_ids, then MaPE
    prefix_splits: list[int]  # indices of the conditional splits prefilled into the uncond cache
    prefix_len: int  # tokens in the uncond cache before the target query
    target_pos: torch.Tensor  # [3, n_target_split] positions of the target query
    rope_pos_used: torch.Tensor  # [3, prefix_len + n_target_split]


def build_uncond_branch(
    layout: Layout,
    ids: torch.Tensor,
    modality: torch.Tensor,
    rope_pos: torch.Tensor,
    target_split: int,
    positions: Callable,
) -> UncondBranch:
    """Caption-free sequence and the positions upstream's KV path feeds its CFG branch.

    `positions(ids, modality, attn_modes) -> (raw, shifted)` recomputes get_rope_index
    + MaPE with the same block grids as the conditional sequence.
    """
    keep = modality != MOD_CAPTION
    starts = split_starts(layout.split_lens)
    # Non-KV view: the splits that survive whole (upstream get_uncond_attn_modes_split_lens);
    # their modes decide whether MaPE applies to the shortened sequence.
    whole = [i for i, (s, n) in enumerate(zip(starts, layout.split_lens)) if bool(keep[s : s + n].all())]
    u_modes = [layout.attn_modes[i] for i in whole]
    _, u_pos = positions(ids[keep], modality[keep], u_modes)
    # KV view: a conditional split is prefilled into the uncond cache when its FIRST
    # token is not caption, and it is prefilled at its conditional positions.
    prefix = [i for i in range(target_split) if int(modality[starts[i]]) != MOD_CAPTION]
    prefix_len = sum(layout.split_lens[i] for i in prefix)
    n_target = layout.split_lens[target_split]
    target_pos = u_pos[:, prefix_len : prefix_len + n_target]
    cached = [rope_pos[:, starts[i] : starts[i] + layout.split_lens[i]] for i in prefix]
    return UncondBranch(
        token_ids=ids[keep], keep=keep, split_lens=[layout.split_lens[i] for i in whole], attn_modes=u_modes,
        rope_pos=u_pos, prefix_splits=prefix, prefix_len=prefix_len, target_pos=target_pos,
        rope_pos_used=torch.cat(cached + [target_pos], dim=1),
    )
