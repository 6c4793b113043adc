"""Byte formulas of the LLM (KV cache, one forward, latent embeddings, logits) and the ViT.

Each formula walks the tensors our own code keeps alive at its busiest moment (read off
`model/mot.py`, `model/attention.py`, `model/layers.py`, `model/vit.py`), in bytes, for the
compute dtype's item size `b` (2 for bf16). Full-size numbers, bf16:

| quantity                                    | formula                                    | value                  |
|---------------------------------------------|--------------------------------------------|------------------------|
| KV cache per token                          | L x 2 (K,V) x Hkv x d x b                  | 36,864 B               |
| KV, t2i 768² (312 ctx / 56 uncond tokens)   | x tokens, 2 caches with text CFG           | 11.5 + 2.1 MB          |
| KV, video_edit 480p x 69 (45,248 / 44,992)  |                                            | 1.67 + 1.66 GB         |
| one layer, denoise query (MLP moment)       | n x (5Db [x_in, h, x, gathered, normed] + 3Ib) | 86,528 B/token     |
|   + cos/sin tables: per forward             | ~79.3 KB/token                             | t2i 768² (n 2,306) 183 MB; t2v 121 f (n 49,292) 3.91 GB |
| attention moment                            | ~47 KB/token + (ctx+n) x 1,024 B (K/V cat) | x2t decode at 16.6k ctx: 17 MB |
| masked causal split (math kernel)           | `math_attention_bytes`                     | x2t_video question (68 after 16,270): 0.65 GB |
| latent embeddings (f64 sin-cos table)       | 16 x D x rows of a block (32 KiB/row)      | t2v 1.62 GB, video_edit 1.64 GB |
| ViT, per patch (rotary moment + inputs)     | ~27 Hv + 2 x 1176 + ...                    | 38.9 KB: x2t_video 64,960 patches 2.53 GB |
| x2t logits (all 256 steps kept, fp32)       | vocab x 4 per step                         | 157 MB                 |

(Each formula is checked against the allocations the torch profiler records on CPU, within 5 %,
in `tests/planning/test_planner.py`.)

Attention: SDPA on a flash-capable GPU (sm80+, bf16/fp16, no mask) keeps O(n) memory and handles
GQA natively. A mask (causal prefill splits of more than one token) or a device without flash
sends GQA to the *math* kernel, which upcasts to fp32, repeats K/V to all heads and materialises
the scores: `math_attention_bytes` — quadratic, so the planner refuses long queries there.
"""

from __future__ import annotations

from dataclasses import dataclass

F32, F64 = 4, 8


@dataclass(frozen=True)
class LLMShape:
    """The backbone dimensions the formulas use (from `llm_config.json`)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, cfg) -> LLMShape:
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)


def kv_bytes_per_token(s: LLMShape, b: int) -> int:
    """K and V of every layer for one token: 36 x 2 x 2 x 128 x 2 = 36,864 B at bf16."""
    return s.layers * 2 * s.kv_heads * s.head_dim * b


def kv_cache_bytes(s: LLMShape, tokens: int, b: int) -> int:
    """A `KVCache` holding `tokens` positions (what `KVCache.nbytes()` reports)."""
    return tokens * kv_bytes_per_token(s, b)


def math_attention_bytes(s: LLMShape, n: int, keys: int, masked: bool) -> int:
    """SDPA's math kernel for n queries over `keys` keys, as profiled on torch 2.13 (within a few %):
    q upcast to fp32 and scaled; K/V upcast, repeated to all heads and K scaled; ~10.5 B per score
    [Hq, n, keys] (fp32 scores, fp32 softmax, half of `_safe_softmax`'s -inf select, its bool map);
    a boolean mask's float copy."""
    q = 2 * n * s.heads * s.head_dim * F32
    kv = (2 * s.kv_heads + 3 * s.heads) * keys * s.head_dim * F32
    scores = s.heads * n * keys * 21 // 2
    mask = n * keys * (F32 + 1) if masked else 0
    return q + kv + scores + mask


def forward_bytes(s: LLMShape, n: int, b: int, *, gen_rows: int = 0, cached: int = 0, math: bool = False,
                  masked: bool = False, linear_input: tuple[int, int] = (0, 0)) -> int:
    """Peak activation bytes of one `LanceLM.forward_chunk` of n tokens over `cached` cached keys.

    Mixed chunks (0 < gen_rows < n: the denoising query, an edit's source split) gather the gen
    rows before each expert call, which costs one more [rows, D] copy per moment. Returns the
    worst per-layer moment plus what lives through all layers (cos/sin fp32 [n, d] x 2).
    `linear_input`: (und, gen) bytes per input element a quantized Linear of that expert holds
    beyond its input (`formats.qlinear.input_transient_bytes`), at the biggest expert call's down
    projection ([m, I] input; the gen expert's whenever the chunk has gen rows).
    """
    D, I, qkv = s.hidden, s.intermediate, (s.heads + 2 * s.kv_heads) * s.head_dim
    q = s.heads * s.head_dim
    mixed = 0 < gen_rows < n
    m = gen_rows if mixed else n  # rows of the biggest expert call
    t = linear_input[1] if gen_rows else linear_input[0]  # what its quantized Linears add per input element
    x = n * D * b  # the residual stream
    gather = m * D * b if mixed else 0
    h = n * D * b  # normed input of the attention
    keys = cached + n
    kernel = math_attention_bytes(s, n, keys, masked) if math else s.heads * n * F32 + n * q * b
    # after the attention: the layer's input (held by the caller's loop from layer 1 on), the
    # attention's normed input `h` (not yet rebound) and the new residual; the fake-CUDA
    # rehearsal found these missing at t2v size (0.56 GiB under the measured denoise peak)
    post = (x if s.layers > 1 else 0) + h + x
    moments = {
        "norm": post + gather + 2 * m * D * F32,
        # silu(gate), up and their product live together; then the product and the down projection's transients
        "mlp": post + gather + m * D * b + max(3 * m * I * b, m * I * (b + t)),
        "qk_norm": x + h + gather + m * qkv * b + 3 * m * q * F32,
        "qkv_cat": x + h + gather + m * qkv * (b + F32) + m * qkv * F32 + (2 * n * qkv * F32 if mixed else 0),
        "rope": x + h + n * qkv * F32 + 3 * n * q * F32,
        # `attend` concatenates cache + chunk K/V per layer; `MoTLayer.pre_attention` has returned,
        # so `h` and the fp32 qkv are gone and only the rotated q / k / v (at b) remain
        "attention": x + n * qkv * b + 2 * keys * s.kv_heads * s.head_dim * b + kernel + n * q * b,
    }
    rope_tables = 2 * n * s.head_dim * F32
    build = 6 * 3 * n * s.head_dim * F32  # mrope_cos_sin intermediates, before the first layer
    return max(max(moments.values()) + rope_tables, build)


def layer_params(s: LLMShape) -> int:
    """Weights of one expert layer's 7 Linears: q, k, v, o and the SwiGLU's three."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return s.hidden * (2 * q + 2 * kv) + 3 * s.hidden * s.intermediate


def forward_flops(s: LLMShape, n: int, cached: int) -> int:
    """Multiply-adds x 2 of one forward of n query rows over `cached` + n keys (every layer):
    the projections and MLPs, plus QKᵀ and PV. Used to estimate when layer copies hide behind
    compute, not for memory."""
    return s.layers * (2 * n * layer_params(s) + 4 * n * (cached + n) * s.heads * s.head_dim)


def latent_embedding_bytes(s: LLMShape, rows: int, largest_block: int, b: int) -> int:
    """`LanceLM.embed_latents` over every latent row: the sin-cos table is built in float64
    (three [rows, ~D/3] pieces + their concatenation = 16 x D bytes per row of the block being
    built, earlier blocks already fp32), then fp32 + bf16 sums (14 x D per row)."""
    D = s.hidden
    build = 2 * largest_block * D * F64 + (rows - largest_block) * D * F32
    concat = 2 * rows * D * F32  # the per-block fp32 tables and their torch.cat
    combine = rows * D * (3 * F32 + b)  # pos + h.float() + their sum, and h itself
    return max(build, concat, combine)


def logits_bytes(s: LLMShape, steps_kept: int) -> int:
    """x2t decode: each step's fp32 logits are kept (the pipeline returns them), plus the
    current step's row, its clone and the masked copy."""
    return (steps_kept + 3) * s.vocab * F32


@dataclass(frozen=True)
class ViTShape:
    hidden: int
    intermediate: int
    heads: int
    out_hidden: int
    patch_in: int  # 3 x 2 x 14 x 14 = 1176 values per patch row

    @classmethod
    def of(cls, vcfg) -> ViTShape:
        return cls(vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_heads, vcfg.out_hidden_size,
                   vcfg.in_chans * vcfg.temporal_patch_size * vcfg.patch_size ** 2)


def vit_bytes(v: ViTShape, patches: int, b: int) -> int:
    """Peak of `QwenViT.forward` over `patches` patch rows (window / per-frame attention runs
    on flash or memory-efficient SDPA: no score matrix). Moments per patch, Hv = 1280:
    rotary of k: x + normed + qkv(3) + q + fp32 k, k·cos, cat, ·sin  -> ~27 Hv bytes at bf16;
    MLP: x + normed + 3 x intermediate. Inputs (patch rows, cos/sin fp32) and the output stay."""
    H, L = v.hidden, patches
    # (+1.25 Hv: the rotary's transient fp32 halves overlap a little more than this list; profiled)
    rope = L * H * (2 * b + 3 * b + b) + L * H * (F32 + F32 + b + F32) + L * H * 5 // 4
    attn = L * H * (2 * b + 3 * b + 2 * b) + L * H * b * 5
    mlp = L * H * 2 * b + 3 * L * v.intermediate * b
    merger = L * H * (b + 2 * F32) + 2 * (L // 4) * 4 * H * b
    keep = L * v.patch_in * b + 2 * L * (H // v.heads) * F32 + (L // 4) * v.out_hidden * b
    return max(rope, attn, mlp, merger) + keep
