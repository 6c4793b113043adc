"""Export wrappers for the MoT layers and the ViT: nn.Modules with tensor-only inputs and outputs.

They reuse the model's own submodules (so the weights and per-expert numerics are the model's),
but replace the two things a tracer cannot keep: index-based expert routing (`Routing`, whose
row sets come from `nonzero`) and the `KVCache` object. Routing in the generation query is
always "row 0 and row n-1 are markers (und expert), rows 1..n-2 are latents (gen expert)", which
slices express with dynamic bounds; the cache becomes explicit past / present tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lance_deploy.model.mot import MoTLayer
from lance_deploy.model.rope import apply_rope
from lance_deploy.model.tree import GEN
from lance_deploy.model.vit import QwenViT, full_attention_lens, patch_hw_positions, segment_groups, window_plan


def _split_markers(x: Tensor) -> tuple[Tensor, Tensor]:
    """[n, ...] -> (rows 0 and n-1 [2, ...], rows 1..n-2 [n-2, ...])."""
    return torch.cat([x[:1], x[-1:]]), x[1:-1]


def _join_markers(und: Tensor, gen: Tensor) -> Tensor:
    """Inverse of `_split_markers`."""
    return torch.cat([und[:1], gen, und[1:]])


def layer_attention(q: Tensor, k_all: Tensor, v_all: Tensor, causal: Tensor | None) -> Tensor:
    """q [n, Hq, d], k_all/v_all [Lc+n, Hkv, d] -> [n, Hq*d].

    GQA is expanded by hand (`enable_gqa` has no ONNX lowering): query head h reads kv head
    h // (Hq/Hkv), which is what SDPA's `enable_gqa` does. `causal` is a bool [1] graph input:
    when true, query i sees keys [0, Lc + i] (bottom-right alignment, as `attend`).
    The mask is built from `arange` over runtime shapes so both lengths stay dynamic.
    """
    n, heads, d = q.shape
    kv_heads = k_all.shape[1]
    rep = heads // kv_heads
    k_all = k_all[:, :, None, :].expand(-1, -1, rep, -1).reshape(-1, heads, d)  # [L, Hq, d]
    v_all = v_all[:, :, None, :].expand(-1, -1, rep, -1).reshape(-1, heads, d)
    mask = None
    if causal is not None:
        total = k_all.shape[0]
        rows = torch.arange(n, device=q.device) + (total - n)  # absolute position of each query
        cols = torch.arange(total, device=q.device)
        mask = (cols[None, :] <= rows[:, None]) | ~causal  # [n, L]; all-true when not causal
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_all.transpose(0, 1)[None], v_all.transpose(0, 1)[None], attn_mask=mask
    )  # [1, Hq, n, d]
    return out[0].transpose(0, 1).reshape(n, heads * d)


def _rope_qkv(layer: MoTLayer, qkv: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype):
    """Split the fused fp32 [n, (Hq+2Hkv)*d] rows and rotate q/k, as `MoTAttention.forward`."""
    a = layer.self_attn
    qd, kd = a.heads * a.head_dim, a.kv_heads * a.head_dim
    q = qkv[:, :qd].reshape(-1, a.heads, a.head_dim)
    k = qkv[:, qd : qd + kd].reshape(-1, a.kv_heads, a.head_dim)
    v = qkv[:, qd + kd :].reshape(-1, a.kv_heads, a.head_dim)
    q = apply_rope(q, cos.float(), sin.float()).to(dtype)
    k = apply_rope(k, cos.float(), sin.float()).to(dtype)
    return q, k, v.to(dtype)


class GenLayerGraph(nn.Module):
    """One MoT layer in generation mode: the denoising query against a read-only cached context.

    Inputs: hidden [n, D] (row 0 and n-1 markers, the rest latents), cos / sin [n, head_dim],
    past_key / past_value [Lc, Hkv, head_dim]. Output: hidden [n, D]. The cache is not updated
    (the noisy target is never written to it), so no present K/V is returned.
    """

    input_names = ("hidden", "cos", "sin", "past_key", "past_value")
    output_names = ("hidden_out",)

    def __init__(self, layer: MoTLayer):
        super().__init__()
        if not layer.self_attn.with_gen:
            raise ValueError("gen-layer export needs a layer built with the generation expert")
        self.layer = layer

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, past_key: Tensor, past_value: Tensor) -> Tensor:
        L, a = self.layer, self.layer.self_attn
        und, gen = _split_markers(hidden)
        qkv = _join_markers(a.qkv(L.input_layernorm(und), ""), a.qkv(L.input_layernorm_moe_gen(gen), GEN))
        q, k, v = _rope_qkv(L, qkv, cos, sin, hidden.dtype)
        k_all, v_all = torch.cat([past_key, k]), torch.cat([past_value, v])
        o_und, o_gen = _split_markers(layer_attention(q, k_all, v_all, None))
        x = hidden + _join_markers(a.o_proj(o_und), a.o_proj_moe_gen(o_gen))
        und, gen = _split_markers(x)
        mlp = _join_markers(
            L.mlp(L.post_attention_layernorm(und)), L.mlp_moe_gen(L.post_attention_layernorm_moe_gen(gen))
        )
        return x + mlp


class UndLayerGraph(nn.Module):
    """One MoT layer in understanding mode (all rows through the und expert) with KV cache in/out.

    Inputs: hidden [n, D], cos / sin [n, head_dim], past_key / past_value [Lc, Hkv, head_dim],
    causal bool [1] (true for text chunks and decode steps, false for a bidirectional vision
    split). Outputs: hidden [n, D], present_key / present_value [Lc+n, Hkv, head_dim].
    """

    input_names = ("hidden", "cos", "sin", "past_key", "past_value", "causal")
    output_names = ("hidden_out", "present_key", "present_value")

    def __init__(self, layer: MoTLayer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, cos, sin, past_key, past_value, causal) -> tuple[Tensor, Tensor, Tensor]:
        L, a = self.layer, self.layer.self_attn
        q, k, v = _rope_qkv(L, a.qkv(L.input_layernorm(hidden), ""), cos, sin, hidden.dtype)
        k_all, v_all = torch.cat([past_key, k]), torch.cat([past_value, v])
        x = hidden + a.o_proj(layer_attention(q, k_all, v_all, causal))
        return x + L.mlp(L.post_attention_layernorm(x)), k_all, v_all


class ViTGraph(nn.Module):
    """QwenViT for one static patch grid (1, h, w); window order, rotary and segments are constants.

    Input: patches [h*w, 3*2*14*14] of one temporal slice (merge-unit-major, as
    `patchify_video_with_merge`). Output: tokens [h*w/4, out_hidden] in merge-unit order.
    """

    input_names = ("patches",)
    output_names = ("tokens",)

    def __init__(self, vit: QwenViT, grid: tuple[int, int, int]):
        super().__init__()
        if grid[0] != 1:
            raise ValueError(f"the ViT graph covers one temporal slice, got grid {grid}")
        self.vit, self.grid = vit, grid
        cfg, unit = vit.cfg, vit.cfg.spatial_merge_size**2
        thw = torch.tensor([grid])
        index, lens = window_plan(thw, vit.window_units, cfg.spatial_merge_size)
        n = grid[1] * grid[2]
        hw = patch_hw_positions(thw, cfg.spatial_merge_size).view(n // unit, unit, 2)[index].reshape(n, 2)
        cos, sin = vit.rotary(hw)
        # Constants of the static grid (traced into initializers), computed once on the CPU here.
        self.register_buffer("window_index", index, persistent=False)
        self.register_buffer("inverse_index", torch.argsort(index), persistent=False)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.window_groups = segment_groups(lens, cfg.num_heads, torch.device("cpu"))
        self.full_groups = segment_groups(full_attention_lens(thw), cfg.num_heads, torch.device("cpu"))

    def forward(self, patches: Tensor) -> Tensor:
        vit, unit = self.vit, self.vit.cfg.spatial_merge_size**2
        x = vit.patch_embed(patches)  # [N, hidden]
        n, hidden = x.shape
        x = x.view(n // unit, unit, hidden)[self.window_index].reshape(n, hidden)  # window order
        full = set(vit.cfg.fullatt_block_indexes)
        for i, blk in enumerate(vit.blocks):
            x = blk(x, self.cos, self.sin, self.full_groups if i in full else self.window_groups)
        # Gather by the inverse permutation instead of a scatter: same result, no ScatterND.
        return vit.merger(x)[self.inverse_index]
