"""The packed token sequence of every Lance task, with its positions and CFG branch.

Generation (t2i, t2v, i2v, image_edit, video_edit):

    [system + "user\\n"] [ViT(src)] [VAE(src)] [caption] [<|im_end|>\\n<|im_start|>assistant\\n] [target] [<|im_end|>]
     causal               full       full_noise causal    causal                                 noise    causal

(the source blocks only for edits). Understanding (x2t):

    [system + "user\\n"] [ViT] [question <|im_end|>\\n<|im_start|>assistant\\n]
     causal              full   causal

See `positions.py` for the MRoPE ids and MaPE, and `UncondBranch` for the exact
positions upstream's KV-cache path uses for the text-unconditional branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.layout import (
    BlockSpec,
    Layout,
    check_user_text,
    generation_blocks,
    lay_out,
    split_starts,
    vit_block,
)
from lance_deploy.pipeline.positions import apply_mape, rope_index
from lance_deploy.pipeline.prompts import render_generation_prompt, render_understanding_prompt
from lance_deploy.pipeline.tokenizer import LanceTokenizer
from lance_deploy.pipeline.uncond import UncondBranch, build_uncond_branch


@dataclass
class VaeBlock:
    """One VAE latent block inside a sequence; its tokens are in (t, h, w) row-major order."""

    start: int  # sequence index of the first latent token (right after <|vision_start|>)
    grid: tuple[int, int, int]  # latent (t, h, w)
    role: str  # 'source' (clean edit condition) | 'target'
    clean_frames: int = 0  # i2v: leading latent frames that are clean conditions (1), else 0

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


class VitBlock(NamedTuple):
    """One ViT block: sequence index of its first token, token count, ViT grid_thw."""

    start: int
    n_tokens: int
    grid: tuple[int, int, int]


@dataclass
class GenSequence:
    """A generation sample. Tensors are int64 on CPU; index tensors are sequence positions."""

    task: str
    rendered_prompt: str  # the prompt with one pad per vision block
    token_ids: torch.Tensor  # [L]
    split_lens: list[int]
    attn_modes: list[str]  # 'causal' | 'full' | 'full_noise' | 'noise'
    token_split_index: torch.Tensor  # [L] split of each token
    token_modality: torch.Tensor  # [L] -1 template, 0 caption, 1 target, 2 source, 4 ViT (markers included)
    text_indexes: torch.Tensor  # text tokens, all vision markers included (und expert)
    vae_indexes: torch.Tensor  # VAE latent tokens, sources before target (gen expert)
    vit_indexes: torch.Tensor  # ViT tokens
    target_indexes: torch.Tensor  # = mse_loss_indexes: latents the sampler updates
    rope_pos: torch.Tensor  # [3, L] after MaPE
    rope_pos_raw: torch.Tensor  # [3, L] get_rope_index output
    rope_grids: list[tuple[int, int, int]]  # grid declared to get_rope_index per block, in order
    vae_blocks: list[VaeBlock]
    vit_blocks: list[VitBlock]
    target_split: int  # index of the 'noise' split
    caption_split: int | None  # index of the caption split (None for an empty caption)
    uncond: UncondBranch
    # With a negative prompt, the CFG branch is this whole sequence (the same template and blocks with
    # the negative text as the caption), run like the conditional one; `uncond` then goes unused.
    negative: GenSequence | None = None

    @property
    def uncond_token_ids(self) -> torch.Tensor:
        return self.uncond.token_ids

    @property
    def uncond_rope_pos(self) -> torch.Tensor:
        return self.uncond.rope_pos

    @property
    def uncond_rope_pos_used(self) -> torch.Tensor:
        return self.uncond.rope_pos_used

    @property
    def uncond_prefix_splits(self) -> list[int]:
        return self.uncond.prefix_splits

    @property
    def uncond_target_pos(self) -> torch.Tensor:
        return self.uncond.target_pos

    @property
    def target_range(self) -> tuple[int, int]:
        """[start, stop) of the target split `[<|vision_start|>, latents, <|vision_end|>]`."""
        start = sum(self.split_lens[: self.target_split])
        return start, start + self.split_lens[self.target_split]


@dataclass
class UndSequence:
    """An x2t prompt. Prefill `prompt_ids[:P-1]` split by split; `prompt_ids[P-1]` is the first decode query."""

    rendered_prompt: str
    prompt_ids: torch.Tensor  # [P] int64, ends with '<|im_start|>assistant\n'
    split_lens: list[int]  # splits of the prompt (sum = P)
    attn_modes: list[str]
    token_split_index: torch.Tensor  # [P]
    vit_indexes: torch.Tensor  # positions of the ViT tokens in prompt_ids
    vit_blocks: list[VitBlock]
    rope_pos: torch.Tensor  # [3, P + max_new_tokens]; column P-1+k is the k-th decode query (no MaPE)
    max_new_tokens: int


def build_generation_sequence(
    tok: LanceTokenizer,
    task: str,
    prompt: str,
    *,
    target_grid: tuple[int, int, int],
    vit_grids: Sequence[tuple[int, int, int]] = (),
    source_grids: Sequence[tuple[int, int, int]] = (),
    tokens_per_second: int = 2,
    merge: int = 2,
    negative_prompt: str | None = None,
) -> GenSequence:
    """Build the packed sequence of a generation task.

    `target_grid` is the latent (t, h, w) of the output; `vit_grids` are ViT grid_thw
    [T/2, H/14, W/14] and `source_grids` latent grids of the edit sources (one ViT
    and one VAE block per source, in that order). i2v's image enters only as the
    clean first latent frame of the target, so it takes neither.

    `negative_prompt` (non-empty) also builds `negative`: the same sequence with that text as the
    caption, which the CFG branch then runs instead of upstream's caption-free one.
    """
    blocks = generation_blocks(task, target_grid, vit_grids, source_grids, merge)
    check_user_text("prompt", prompt)
    negative = None
    if negative_prompt:
        check_user_text("negative prompt", negative_prompt)
        negative = build_generation_sequence(tok, task, negative_prompt, target_grid=target_grid, vit_grids=vit_grids,
                                             source_grids=source_grids, tokens_per_second=tokens_per_second,
                                             merge=merge)
    rendered = render_generation_prompt(task, prompt, len(blocks) - 1)
    layout = lay_out(tok, rendered, blocks, caption=prompt)
    grids = [b.rope_grid for b in blocks]

    def positions(ids, modality, modes):
        # The uncond branch reuses this with the same grids: dropping the caption removes no block.
        raw = rope_index(ids, grids, vision_start_id=tok.vision_start, pad_id=tok.video_pad,
                         merge=merge, tokens_per_second=tokens_per_second)
        return raw, apply_mape(raw, modality, modes)

    ids = torch.tensor(layout.token_ids, dtype=torch.long)
    modality = torch.tensor(layout.modality, dtype=torch.long)
    raw, pos = positions(ids, modality, layout.attn_modes)
    vae_blocks, vit_blocks = _block_records(task, layout, blocks)
    target_split = layout.attn_modes.index("noise")
    uncond = build_uncond_branch(layout, ids, modality, pos, target_split, positions)
    return GenSequence(
        task=task, rendered_prompt=rendered, token_ids=ids,
        split_lens=layout.split_lens, attn_modes=layout.attn_modes,
        token_split_index=_split_index(layout.split_lens), token_modality=modality,
        **_index_tensors(layout, vae_blocks, vit_blocks),
        rope_pos=pos, rope_pos_raw=raw, rope_grids=grids,
        vae_blocks=vae_blocks, vit_blocks=vit_blocks, target_split=target_split,
        caption_split=_caption_split(layout), uncond=uncond, negative=negative,
    )


def build_understanding_sequence(
    tok: LanceTokenizer,
    system: str,
    question: str,
    vit_grid: tuple[int, int, int],
    max_new_tokens: int,
    *,
    tokens_per_second: int = 2,
    merge: int = 2,
) -> UndSequence:
    """Build an x2t prompt: system, `[ViT block][question]`, then `<|im_start|>assistant\\n`.

    Positions cover the prompt plus `max_new_tokens` pad ids (text continues
    linearly), exactly the ids upstream computes once before decoding.
    """
    if max_new_tokens < 1:
        raise LanceUsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_user_text("system prompt", system)
    check_user_text("question", question)
    block = vit_block(vit_grid, merge)
    rendered = render_understanding_prompt(system, question)
    layout = lay_out(tok, rendered, [block])  # no caption: nothing is dropped in x2t
    padded = layout.token_ids + [tok.pad] * max_new_tokens
    rope = rope_index(padded, [block.rope_grid], vision_start_id=tok.vision_start, pad_id=tok.video_pad,
                      merge=merge, tokens_per_second=tokens_per_second)
    start = layout.block_starts[0] + 1
    return UndSequence(
        rendered_prompt=rendered, prompt_ids=torch.tensor(layout.token_ids, dtype=torch.long),
        split_lens=layout.split_lens, attn_modes=layout.attn_modes,
        token_split_index=_split_index(layout.split_lens),
        vit_indexes=torch.arange(start, start + block.n_tokens),
        vit_blocks=[VitBlock(start, block.n_tokens, block.grid)],
        rope_pos=rope, max_new_tokens=max_new_tokens,
    )


# -- helpers ---------------------------------------------------------------------------------


def _block_records(
    task: str, layout: Layout, blocks: Sequence[BlockSpec]
) -> tuple[list[VaeBlock], list[VitBlock]]:
    """VaeBlock/VitBlock records with the sequence index of each block's first token."""
    vae, vit = [], []
    for start, block in zip(layout.block_starts, blocks):
        if block.kind == "vit":
            vit.append(VitBlock(start + 1, block.n_tokens, block.grid))
        else:
            # i2v: latent frame 0 of the target is the encoded input image (clean, t = 0).
            clean = 1 if (task == "i2v" and block.kind == "target") else 0
            vae.append(VaeBlock(start + 1, block.grid, block.kind, clean))
    return vae, vit


def _index_tensors(layout: Layout, vae_blocks: list[VaeBlock], vit_blocks: list[VitBlock]) -> dict:
    """text/vae/vit/target index tensors (ascending sequence positions)."""
    is_text = torch.ones(len(layout.token_ids), dtype=torch.bool)
    vae, target = [], []
    for b in vae_blocks:
        rows = torch.arange(b.start, b.start + b.n_tokens)
        is_text[rows] = False
        vae.append(rows)
        if b.role == "target":
            target.append(rows[b.clean_frames * b.grid[1] * b.grid[2] :])
    vit = [torch.arange(b.start, b.start + b.n_tokens) for b in vit_blocks]
    for rows in vit:
        is_text[rows] = False
    return dict(
        text_indexes=torch.nonzero(is_text).flatten(),
        vae_indexes=_cat(vae), vit_indexes=_cat(vit), target_indexes=_cat(target),
    )


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _split_index(split_lens: list[int]) -> torch.Tensor:
    """[L] index of the split each token belongs to."""
    return torch.repeat_interleave(torch.arange(len(split_lens)), torch.tensor(split_lens))


def _caption_split(layout: Layout) -> int | None:
    # The caption always starts its own split (see layout._text_split).
    if layout.caption_span is None:
        return None
    return split_starts(layout.split_lens).index(layout.caption_span[0])
