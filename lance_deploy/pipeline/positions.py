"""MRoPE position ids (Qwen2.5-VL `get_rope_index` semantics) and the MaPE shifts.

Lance declares every vision block as a *video* block of `<|video_pad|>` tokens:

* text advances one position per token on all three axes;
* a block with grid (T, H, W) has T x H/m x W/m tokens (m = spatial merge 2) at
  `base + (frame * second_per_grid * tokens_per_second, row, col)`, where `base` is
  the position the first pad would have as text (so `<|vision_start|>` keeps the
  running text position and the block starts one after it);
* the text after a block resumes at (max over the block's three axes) + 1.

ViT blocks are declared with their ViT grid [T/2, H/14, W/14]; VAE blocks with
[t, 2h, 2w] so that after the /2 merge there is one id per latent cell, and the
temporal index of latent frame k is 2k.

MaPE (generation only; x2t gets none) re-anchors the positions by modality label:
ViT tokens (4) get their t axis moved to start at 1000, reference images (3) at
2000, and an edit target (1) takes the source's (2) three axes when the two have
the same token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MOD_TEMPLATE = -1  # system prompt and chat-template text
MOD_CAPTION = 0  # the user caption/instruction: what text-CFG drops
MOD_TARGET = 1  # the noisy target block
MOD_SOURCE = 2  # the clean VAE block of an edit source
MOD_REFERENCE = 3  # a clean VAE reference image (subject-driven tasks; no task here builds one)
MOD_VIT = 4  # a ViT block

MAPE_VIT_ANCHOR = 1000
MAPE_REFERENCE_ANCHOR = 2000
MAPE_TRIGGER_MODES = ("full", "full_noise")


def rope_index(
    token_ids: Sequence[int] | torch.Tensor,
    grids: Sequence[Sequence[int]],
    *,
    vision_start_id: int,
    pad_id: int,
    merge: int = 2,
    tokens_per_second: int = 2,
    second_per_grid: float = 1.0,
) -> torch.Tensor:
    """MRoPE ids [3 (t, h, w), L] int64 of a token sequence with one grid per vision block.

    `grids[i]` is the grid declared for the i-th `<|vision_start|>` + pads block, in
    sequence order (ViT blocks: ViT grid_thw; VAE blocks: [t, 2h, 2w]).
    """
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [int(i) for i in token_ids]
    out = torch.empty(3, len(ids), dtype=torch.long)
    cursor, next_pos = 0, 0
    for k, grid in enumerate(grids):
        first_pad = _find_block(ids, cursor, k, vision_start_id, pad_id)
        n_text = first_pad - cursor
        out[:, cursor:first_pad] = torch.arange(next_pos, next_pos + n_text)
        block = _block_positions(grid, merge, tokens_per_second, second_per_grid) + (next_pos + n_text)
        n = block.shape[1]
        if ids[first_pad : first_pad + n].count(pad_id) != n or ids[first_pad + n : first_pad + n + 1] == [pad_id]:
            raise ValueError(f"vision block {k}: grid {tuple(grid)} does not match its number of pad tokens")
        out[:, first_pad : first_pad + n] = block
        next_pos = int(block.max()) + 1
        cursor = first_pad + n
    out[:, cursor:] = torch.arange(next_pos, next_pos + len(ids) - cursor)
    return out


def _find_block(ids: list[int], start: int, k: int, vision_start_id: int, pad_id: int) -> int:
    """Index of the first pad of the next vision block at or after `start`."""
    try:
        first_pad = ids.index(pad_id, start)
    except ValueError:
        raise ValueError(f"vision block {k}: no pad token left in the sequence") from None
    if first_pad == 0 or ids[first_pad - 1] != vision_start_id:
        raise ValueError(f"vision block {k}: pad at {first_pad} does not follow <|vision_start|>")
    return first_pad


def _block_positions(grid: Sequence[int], merge: int, tokens_per_second: int, second_per_grid: float) -> torch.Tensor:
    """Offsets [3, T*Hm*Wm] of one block, tokens in (t, h, w) row-major order."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    # Upstream multiplies in float and truncates (`.long()`); with 1.0 x 2 this is 2*frame.
    frames = (torch.arange(t, dtype=torch.float64) * second_per_grid * tokens_per_second).long()
    tt = frames.view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1)  # [3, t*h*w]


def apply_mape(rope_pos: torch.Tensor, modality: torch.Tensor, attn_modes: Sequence[str]) -> torch.Tensor:
    """MaPE (upstream `shift_position_ids`, pro_type 10) on [3, L] ids; returns a new tensor.

    Nothing moves unless the sequence has a clean condition split (`full` ViT or
    `full_noise` source), so t2i/t2v/i2v keep their raw ids.
    """
    pos = rope_pos.clone()
    if not any(mode in MAPE_TRIGGER_MODES for mode in attn_modes):
        return pos
    _reanchor_t(pos, _where(modality, MOD_VIT), MAPE_VIT_ANCHOR)
    _reanchor_t(pos, _where(modality, MOD_REFERENCE), MAPE_REFERENCE_ANCHOR)
    source, target = _where(modality, MOD_SOURCE), _where(modality, MOD_TARGET)
    # Same-size edit: the target is generated "in place" of the source, markers included.
    if int(pos[:, source].sum()) != 0 and source.numel() == target.numel():
        pos[:, target] = pos[:, source]
    return pos


def _where(modality: torch.Tensor, label: int) -> torch.Tensor:
    return torch.nonzero(modality == label).flatten()  # index tensors: much faster than bool masks here


def _reanchor_t(pos: torch.Tensor, idx: torch.Tensor, anchor: int) -> None:
    # One shift for every token of the label (all blocks of it together), taken from
    # the t id of its first token; h and w keep their text-anchored values.
    if int(pos[:, idx].sum()) != 0:
        pos[0, idx] += anchor - pos[0, idx[0]]
