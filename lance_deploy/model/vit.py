"""The Qwen2.5-VL vision encoder exactly as Lance runs it (`--vit_type qwen_2_5_vl_original`).

Pipeline, per call:

1. `patchify_video_with_merge` turns CLIP-normalised pixels [3, T, H, W] into rows of 3*2*14*14 values, ordered
   so that the 4 patches of every 2x2 merge unit are consecutive (merge-unit-major order).
2. The patch embedding (a Conv3d whose kernel equals its stride, i.e. a linear map) gives one vector per patch.
3. Merge units are permuted into *window order*: 4x4-unit (112 px) windows, one temporal slice after another.
   Most blocks attend only inside a window; the blocks in `fullatt_block_indexes` attend inside a whole temporal
   slice (never across time). Both are block-diagonal, so we run SDPA per segment instead of building the dense
   [L, L] mask that upstream's sdpa path allocates.
4. 2-D rotary embeddings (theta 10000) over the (h, w) patch coordinates; the first half of the rotary
   frequencies encode h, the second half w.
5. The merger (RMSNorm, concat 2x2, MLP) emits one token per merge unit; the window permutation is undone so the
   tokens come out in merge-unit order: (t, h/2, w/2) row-major per grid, grids in input order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lance_deploy.config import VisionConfig
from lance_deploy.model.layers import RMSNorm
from lance_deploy.model.rope import apply_rope

ROPE_THETA = 10000.0
NORM_EPS = 1e-6

# Upper bound on attention-score elements (segments x heads x len x len) per SDPA call. Flash / memory-efficient
# kernels never materialise the scores, but the CPU math fallback does; chunking keeps that bounded (~1 GiB fp32).
_SCORE_BUDGET = 1 << 28


# ----------------------------------------------------------------------------------------------------------------
# Patchify
# ----------------------------------------------------------------------------------------------------------------


def patchify_video_with_merge(
    pixels: Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[Tensor, Tensor]:
    """Cut CLIP-normalised pixels into ViT patch rows in merge-unit-major order.

    Args:
        pixels: [C, T, H, W]; T a multiple of `temporal_patch_size` (callers repeat the last frame of an
            odd-length clip and repeat an image to 2 frames), H and W multiples of `patch_size * merge_size`.
    Returns:
        patches: [T/tp * H/p * W/p, C*tp*p*p], rows ordered (t, h/(p*m), w/(p*m), m, m), each row laid out
            (C, tp, p, p) to match the Conv3d weight layout.
        grid_thw: LongTensor [1, 3] = [[T/tp, H/p, W/p]] (in patches, before the 2x2 merge).
    """
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be [C, T, H, W], got shape {tuple(pixels.shape)}")
    c, t, h, w = pixels.shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    if t % tp:
        raise ValueError(f"frame count {t} is not a multiple of {tp}; repeat the last frame first")
    if h % (p * m) or w % (p * m):
        raise ValueError(f"H x W = {h} x {w} must be multiples of {p * m}")
    gt, gh, gw = t // tp, h // p, w // p
    # [C, T, H, W] -> [C, gt, tp, gh/m, m, p, gw/m, m, p]
    x = pixels.reshape(c, gt, tp, gh // m, m, p, gw // m, m, p)
    # -> [gt, gh/m, gw/m, m(h), m(w), C, tp, p(h), p(w)]: merge unit outer, the patch's own pixels inner
    x = x.permute(1, 3, 6, 4, 7, 0, 2, 5, 8)
    patches = x.reshape(gt * gh * gw, c * tp * p * p)
    grid_thw = torch.tensor([[gt, gh, gw]], dtype=torch.long)
    return patches, grid_thw


# ----------------------------------------------------------------------------------------------------------------
# Index plans (pure integer bookkeeping, computed once per forward on the CPU)
# ----------------------------------------------------------------------------------------------------------------


def _grids(grid_thw: Tensor) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row) for row in grid_thw.reshape(-1, 3).tolist()]


def patch_hw_positions(grid_thw: Tensor, merge_size: int) -> Tensor:
    """(h, w) patch coordinates of every patch in merge-unit-major order -> LongTensor [N, 2].

    The temporal coordinate plays no part in the ViT's rotary embedding: every temporal slice repeats the same
    spatial positions.
    """
    m = merge_size
    out = []
    for t, gh, gw in _grids(grid_thw):
        uy = torch.arange(gh // m).view(-1, 1, 1, 1)  # merge-unit row
        ux = torch.arange(gw // m).view(1, -1, 1, 1)  # merge-unit column
        dy = torch.arange(m).view(1, 1, -1, 1)  # row inside the unit
        dx = torch.arange(m).view(1, 1, 1, -1)  # column inside the unit
        hh = (uy * m + dy).expand(gh // m, gw // m, m, m)  # [gh/m, gw/m, m, m]
        ww = (ux * m + dx).expand(gh // m, gw // m, m, m)
        hw = torch.stack([hh.reshape(-1), ww.reshape(-1)], dim=-1)  # [gh*gw, 2]
        out.append(hw.repeat(t, 1))  # [t*gh*gw, 2]
    return torch.cat(out, dim=0)


def window_plan(grid_thw: Tensor, window_units: int, merge_size: int) -> tuple[Tensor, list[int]]:
    """Order merge units window by window.

    Each grid's merge-unit lattice [t, gh/m, gw/m] is tiled with `window_units` x `window_units` windows anchored
    at the top-left; windows at the right/bottom edge are partial. Windows are visited per temporal slice,
    row-major, and the units inside a window row-major. Grids follow one another.

    Returns:
        window_index: LongTensor [N/m^2]; position j of the window-ordered sequence holds merge unit
            window_index[j] of the original (merge-unit-major) order.
        window_lens: lengths, in *patches*, of the non-empty windows in sequence order.
    """
    k = window_units
    index, lens, offset = [], [], 0
    for t, gh, gw in _grids(grid_thw):
        mh, mw = gh // merge_size, gw // merge_size
        nh, nw = -(-mh // k), -(-mw // k)  # windows per column / row (ceil)
        tt = torch.arange(t).view(-1, 1, 1)
        yy = torch.arange(mh).view(1, -1, 1)
        xx = torch.arange(mw).view(1, 1, -1)
        window_id = (tt * nh + yy // k) * nw + xx // k  # [t, mh, mw]
        # Unique sort key: window first, then row-major inside the window.
        key = window_id * (k * k) + (yy % k) * k + xx % k
        index.append(torch.argsort(key.reshape(-1)) + offset)
        counts = torch.bincount(window_id.reshape(-1), minlength=t * nh * nw)
        lens.extend(int(c) * merge_size**2 for c in counts.tolist() if c > 0)
        offset += t * mh * mw
    return torch.cat(index), lens


def full_attention_lens(grid_thw: Tensor) -> list[int]:
    """Segment lengths (patches) of the "full" attention blocks: one segment per temporal slice of each grid.

    Window order keeps every temporal slice contiguous, so these segments apply to the window-ordered sequence.
    """
    return [gh * gw for t, gh, gw in _grids(grid_thw) for _ in range(t)]


def segment_groups(lens: list[int], num_heads: int, device: torch.device) -> list[Tensor]:
    """Pack equal-length contiguous segments into gather indices for batched SDPA.

    Returns a list of LongTensors [n_segments, seg_len]; each row lists the sequence positions of one segment.
    Segments of one length are batched together (a frame has at most 4 distinct window sizes), and each batch is
    capped so segments x heads x len^2 stays under _SCORE_BUDGET.
    """
    starts: dict[int, list[int]] = {}
    pos = 0
    for n in lens:
        if n > 0:
            starts.setdefault(n, []).append(pos)
        pos += n
    groups = []
    for n, s in starts.items():
        per_call = max(1, _SCORE_BUDGET // (num_heads * n * n))
        s_t = torch.tensor(s, dtype=torch.long)
        for i in range(0, len(s), per_call):
            idx = s_t[i : i + per_call, None] + torch.arange(n)  # [segments, n]
            groups.append(idx.to(device))
    return groups


# ----------------------------------------------------------------------------------------------------------------
# Modules (attribute names mirror the checkpoint keys)
# ----------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv3d(C -> hidden, kernel = stride = (tp, p, p), no bias) applied to pre-cut patch rows."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: Tensor) -> Tensor:
        # A stride = kernel convolution over one patch is a dot product with the flattened (C, tp, p, p) kernel,
        # which is exactly the row layout: a plain matmul avoids the Conv3d reshape and its slow kernels.
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.reshape(w.shape[0], -1))  # [N, hidden]


class VisionAttention(nn.Module):
    """Fused-qkv multi-head attention restricted to contiguous segments (block-diagonal)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, groups: list[Tensor]) -> Tensor:
        seq, dim = x.shape
        # [L, 3*dim] -> [L, 3, heads, head_dim]; q/k/v split on the second axis (upstream's fused layout)
        q, k, v = self.qkv(x).reshape(seq, 3, self.num_heads, -1).unbind(1)
        # Rotary in fp32, like upstream, then back to the compute dtype.
        q = apply_rope(q.float(), cos, sin).to(x.dtype)
        k = apply_rope(k.float(), cos, sin).to(x.dtype)
        out = torch.empty_like(q)  # [L, heads, head_dim]; every row is covered by exactly one segment
        for idx in groups:
            # gather [S, n] rows -> [S, n, heads, hd] -> [S, heads, n, hd]
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)  # scale 1/sqrt(head_dim)
            out[idx] = o.transpose(1, 2)
        return self.proj(out.reshape(seq, dim))


class VisionMLP(nn.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=NORM_EPS)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=NORM_EPS)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, groups: list[Tensor]) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate the 4 patches of a merge unit, then Linear-GELU-Linear to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.unit_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(self.unit_dim, self.unit_dim), nn.GELU(), nn.Linear(self.unit_dim, cfg.out_hidden_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        # [L, hidden] -> [L/4, 4*hidden]: the 4 patches of a unit are consecutive in both orders
        return self.mlp(self.ln_q(x).reshape(-1, self.unit_dim))


class QwenViT(nn.Module):
    """Qwen2.5-VL vision encoder; parameter names equal the keys of `Qwen2.5-VL-ViT/vit.safetensors`.

    Computes in the dtype of its weights (rotary and RMSNorm statistics in fp32, as upstream).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise ValueError(f"head_dim {cfg.head_dim} must be a multiple of 4 for the 2-D rotary")
        window_units, rem = divmod(cfg.window_size, cfg.spatial_merge_size * cfg.patch_size)
        if rem or window_units < 1:
            raise ValueError(f"window_size {cfg.window_size} must be a multiple of {cfg.spatial_merge_size * cfg.patch_size}")
        self.cfg = cfg
        self.window_units = window_units  # 112 px / 28 px = 4 merge units per window side
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rotary(self, hw: Tensor) -> tuple[Tensor, Tensor]:
        """(h, w) positions [L, 2] -> fp32 (cos, sin) [L, head_dim], laid out [h-angles, w-angles] twice."""
        # head_dim/2 rotary angles per token: head_dim/4 frequencies for h, the same ones again for w.
        # Computed here, not as a buffer, so a meta-built model needs no extra materialisation step.
        rot = self.cfg.head_dim // 2
        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, rot, 2, dtype=torch.float32, device=hw.device) / rot))
        angles = torch.cat([hw[:, :1].float() * inv, hw[:, 1:].float() * inv], dim=-1)  # [L, head_dim/2]
        emb = torch.cat([angles, angles], dim=-1)  # [L, head_dim]
        return emb.cos(), emb.sin()

    def _check_inputs(self, patches: Tensor, grid_thw: Tensor) -> None:
        c = self.cfg
        row = c.in_chans * c.temporal_patch_size * c.patch_size**2
        grids = _grids(grid_thw)
        n = sum(t * h * w for t, h, w in grids)
        if patches.dim() != 2 or patches.shape != (n, row):
            raise ValueError(f"patches {tuple(patches.shape)} do not match grid_thw {grids} (expected [{n}, {row}])")
        m = c.spatial_merge_size
        if any(h % m or w % m or t < 1 for t, h, w in grids):
            raise ValueError(f"grid_thw {grids}: h and w must be multiples of {m}")

    def forward(self, patches: Tensor, grid_thw: Tensor) -> Tensor:
        """Encode patch rows into LLM-ready vision tokens.

        Args:
            patches: [N, 3*2*14*14] rows from `patchify_video_with_merge` (several grids concatenated allowed).
            grid_thw: [G, 3] (t, h, w) in patches per grid.
        Returns:
            [N/4, out_hidden_size], one token per 2x2 merge unit in merge-unit order.
        """
        self._check_inputs(patches, grid_thw)
        unit = self.cfg.spatial_merge_size**2
        dev = patches.device
        window_index, window_lens = window_plan(grid_thw, self.window_units, self.cfg.spatial_merge_size)
        window_groups = segment_groups(window_lens, self.cfg.num_heads, dev)
        full_groups = segment_groups(full_attention_lens(grid_thw), self.cfg.num_heads, dev)
        window_index = window_index.to(dev)

        x = self.patch_embed(patches)  # [N, hidden]
        n, hidden = x.shape
        # Permute whole merge units into window order: [N/4, 4, hidden] gathered by unit.
        x = x.view(n // unit, unit, hidden)[window_index].reshape(n, hidden)
        hw = patch_hw_positions(grid_thw, self.cfg.spatial_merge_size).to(dev)
        hw = hw.view(n // unit, unit, 2)[window_index].reshape(n, 2)
        cos, sin = self.rotary(hw)

        full = set(self.cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, full_groups if i in full else window_groups)

        merged = self.merger(x)  # [N/4, out], window order
        out = torch.empty_like(merged)
        out[window_index] = merged  # undo the window permutation -> merge-unit order
        return out
