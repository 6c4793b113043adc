"""Token layout of one Lance sample: block expansion, caption span, splits, modality labels.

The rendered prompt (one pad per vision block) is tokenised as a whole, as
upstream does, then each `<|vision_start|><|video_pad|><|vision_end|>` triple is
expanded to the block's token count. The caption is located as the first
occurrence of its own token ids, and the text before each vision block is cut
into `[before caption | caption | after caption]` causal splits so that text-CFG
can drop the caption split alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.tasks import EDIT_TASKS
from lance_deploy.pipeline.positions import MOD_CAPTION, MOD_SOURCE, MOD_TARGET, MOD_TEMPLATE, MOD_VIT
from lance_deploy.pipeline.prompts import RESERVED_MARKERS, SYSTEM_PROMPTS
from lance_deploy.pipeline.tokenizer import LanceTokenizer

BLOCK_ATTN_MODE = {"vit": "full", "source": "full_noise", "target": "noise"}
BLOCK_MODALITY = {"vit": MOD_VIT, "source": MOD_SOURCE, "target": MOD_TARGET}


@dataclass(frozen=True)
class BlockSpec:
    """One vision block to lay out.

    `grid` is the block's own grid (ViT grid_thw, or latent (t, h, w) for VAE blocks);
    `rope_grid` the grid declared to get_rope_index for it.
    """

    kind: str  # 'vit' | 'source' | 'target'
    grid: tuple[int, int, int]
    n_tokens: int
    rope_grid: tuple[int, int, int]


@dataclass
class Layout:
    """Token ids and split structure of a sample (plain lists; the builders make tensors)."""

    token_ids: list[int]
    block_starts: list[int]  # index of each block's <|vision_start|>
    split_lens: list[int]
    attn_modes: list[str]
    modality: list[int]
    caption_span: tuple[int, int] | None  # [start, stop) of the caption tokens


def check_user_text(name: str, text: str) -> None:
    """Reject text that would tokenise into vision markers and corrupt the block layout."""
    for marker in RESERVED_MARKERS:
        if marker in text:
            raise LanceUsageError(f"{name} contains the reserved token {marker!r}; remove it")


def lay_out(tok: LanceTokenizer, rendered: str, blocks: Sequence[BlockSpec], caption: str = "") -> Layout:
    """Tokenise `rendered`, expand its vision placeholders and derive splits and labels."""
    ids, starts = expand_blocks(tok, tok.encode(rendered), blocks)
    span = find_caption(ids, tok.encode(caption)) if caption else None
    split_lens, attn_modes = _splits(len(ids), starts, blocks, span)
    modality = [MOD_TEMPLATE] * len(ids)
    for start, block in zip(starts, blocks):
        modality[start : start + block.n_tokens + 2] = [BLOCK_MODALITY[block.kind]] * (block.n_tokens + 2)
    if span is not None:
        modality[span[0] : span[1]] = [MOD_CAPTION] * (span[1] - span[0])
    return Layout(ids, starts, split_lens, attn_modes, modality, span)


def expand_blocks(tok: LanceTokenizer, base: list[int], blocks: Sequence[BlockSpec]) -> tuple[list[int], list[int]]:
    """Replace the i-th `vs, pad, ve` triple of `base` by `vs, pad x n_i, ve`."""
    ids, starts, cursor = [], [], 0
    for k, block in enumerate(blocks):
        try:
            vs = base.index(tok.vision_start, cursor)
        except ValueError:
            msg = f"rendered prompt has {k} vision placeholders, fewer than the {len(blocks)} blocks"
            raise ValueError(msg) from None
        if base[vs + 1 : vs + 3] != [tok.video_pad, tok.vision_end]:
            raise ValueError(f"vision placeholder {k} is not <|vision_start|><|video_pad|><|vision_end|>")
        ids.extend(base[cursor:vs])
        starts.append(len(ids))
        ids.extend([tok.vision_start] + [tok.video_pad] * block.n_tokens + [tok.vision_end])
        cursor = vs + 3
    if tok.vision_start in base[cursor:]:
        raise ValueError(f"rendered prompt has more vision placeholders than the {len(blocks)} blocks given")
    ids.extend(base[cursor:])
    return ids, starts


def find_caption(ids: list[int], caption_ids: list[int]) -> tuple[int, int] | None:
    """[start, stop) of the first occurrence of `caption_ids` in `ids` (upstream's search)."""
    n = len(caption_ids)
    if n == 0:
        return None
    i = -1
    while True:  # jump between occurrences of the first id: sequences reach ~10^5 tokens
        try:
            i = ids.index(caption_ids[0], i + 1)
        except ValueError:
            break
        if ids[i : i + n] == caption_ids:
            return i, i + n
    # Only a caption whose first pre-token merges with the text before it in context
    # (e.g. one starting with a newline) gets here; upstream fails the same way.
    raise LanceUsageError("the caption tokenises differently inside the prompt; strip leading newlines from it")


def _splits(
    n_total: int, starts: list[int], blocks: Sequence[BlockSpec], span: tuple[int, int] | None
) -> tuple[list[int], list[str]]:
    lens, modes, cursor = [], [], 0
    for start, block in zip(starts, blocks):
        if start > cursor:
            text = _text_split(cursor, start, span)
            lens += text
            modes += ["causal"] * len(text)
        lens.append(block.n_tokens + 2)  # markers belong to the block's split
        modes.append(BLOCK_ATTN_MODE[block.kind])
        cursor = start + block.n_tokens + 2
    if cursor < n_total:
        # Upstream never cuts the caption out of the text after the last block; no
        # layout here puts it there (the target block comes after the caption).
        lens.append(n_total - cursor)
        modes.append("causal")
    return lens, modes


def _text_split(a: int, b: int, span: tuple[int, int] | None) -> list[int]:
    """Lengths of the causal splits covering [a, b): cut around the caption if it starts there."""
    if span is None or not a <= span[0] < b:
        return [b - a]
    before, inside = span[0] - a, span[1] - span[0]
    return [n for n in (before, inside, b - a - before - inside) if n != 0]


def split_starts(split_lens: Sequence[int]) -> list[int]:
    """Sequence index of the first token of each split."""
    starts, acc = [], 0
    for n in split_lens:
        starts.append(acc)
        acc += n
    return starts


# -- the vision blocks of each task ---------------------------------------------------------


def generation_blocks(task: str, target_grid, vit_grids, source_grids, merge: int) -> list[BlockSpec]:
    """The vision blocks of a generation task in sequence order (condition blocks, then the target)."""
    if task not in SYSTEM_PROMPTS:
        raise LanceUsageError(f"unknown generation task {task!r}; expected one of {', '.join(SYSTEM_PROMPTS)}")
    if task in EDIT_TASKS:
        if not source_grids or len(vit_grids) != len(source_grids):
            raise LanceUsageError(
                f"{task} needs one ViT grid per source latent grid (got {len(vit_grids)} and {len(source_grids)})"
            )
    elif vit_grids or source_grids:
        raise LanceUsageError(f"{task} takes no condition blocks (vit_grids/source_grids must be empty)")
    target = vae_block("target", target_grid, merge)
    if task == "t2i" and target.grid[0] != 1:
        raise LanceUsageError(f"t2i generates one image: target_grid t must be 1, got {target.grid[0]}")
    if task == "i2v" and target.grid[0] < 2:
        raise LanceUsageError("i2v needs at least 2 latent frames (5 video frames): frame 0 is the input image")
    blocks = []
    for vit, src in zip(vit_grids, source_grids):
        blocks += [vit_block(vit, merge), vae_block("source", src, merge)]
    return blocks + [target]


def vit_block(grid, merge: int) -> BlockSpec:
    """A ViT block: grid_thw [T/2, H/14, W/14], one token per merge x merge unit."""
    t, h, w = (int(x) for x in grid)
    if min(t, h, w) < 1 or h % merge or w % merge:
        raise LanceUsageError(f"ViT grid {(t, h, w)}: t, h, w must be positive and h, w divisible by {merge}")
    return BlockSpec("vit", (t, h, w), t * (h // merge) * (w // merge), (t, h, w))


def vae_block(kind: str, grid, merge: int) -> BlockSpec:
    """A VAE block of latent grid (t, h, w): one token per latent cell."""
    t, h, w = (int(x) for x in grid)
    if min(t, h, w) < 1:
        raise LanceUsageError(f"{kind} latent grid {(t, h, w)} must be positive (t, h, w)")
    # Declared as [t, m*h, m*w] so the /m merge of get_rope_index yields one id per latent cell.
    return BlockSpec(kind, (t, h, w), t * h * w, (t, h * merge, w * merge))
