"""The Mixture-of-Transformers backbone: an understanding expert and its `_moe_gen` twin.

Both experts share one attention over the joint sequence; each token is projected
and normed by the weights of its own expert. Parameter names equal the release
checkpoint keys (`language_model.model.layers.L.self_attn.q_proj_moe_gen.weight`, ...);
`model/tree.py` states the naming rule and maps the canonical leaves to these modules.
With `with_gen=False` the generation expert is not built at all (understanding tasks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lance_deploy.config import LLMConfig
from lance_deploy.model.attention import KVCache, attend
from lance_deploy.model.layers import RMSNorm, SwiGLU
from lance_deploy.model.rope import apply_rope
from lance_deploy.model.tree import GEN


@dataclass
class Routing:
    """Which rows of a query chunk go through which expert (None = all rows und)."""

    und_rows: torch.Tensor | None = None
    gen_rows: torch.Tensor | None = None

    @property
    def is_mixed(self) -> bool:
        return self.gen_rows is not None and self.gen_rows.numel() > 0

    @staticmethod
    def of(n: int, gen_rows: torch.Tensor | None, device=None) -> Routing:
        if gen_rows is None or gen_rows.numel() == 0:
            return Routing()
        mask = torch.ones(n, dtype=torch.bool, device=device)
        mask[gen_rows] = False
        return Routing(und_rows=mask.nonzero().flatten(), gen_rows=gen_rows.to(device))


def route(x: torch.Tensor, routing: Routing, und_fn, gen_fn, out_dim: int | None = None) -> torch.Tensor:
    """Apply `und_fn` to und rows and `gen_fn` to gen rows, keeping row order."""
    if not routing.is_mixed:
        return und_fn(x)
    und_out = und_fn(x[routing.und_rows])
    gen_out = gen_fn(x[routing.gen_rows])
    out = x.new_empty((x.shape[0], out_dim or und_out.shape[-1]), dtype=gen_out.dtype)
    out[routing.und_rows] = und_out.to(gen_out.dtype)
    out[routing.gen_rows] = gen_out
    return out


class MoTAttention(nn.Module):
    """Per-expert q/k/v/o projections and QK-norms around one shared attention."""

    def __init__(self, cfg: LLMConfig, layer: int, with_gen: bool):
        super().__init__()
        self.layer, self.with_gen = layer, with_gen
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        suffixes = ["", GEN] if with_gen else [""]
        for s in suffixes:
            setattr(self, f"q_proj{s}", nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True))
            setattr(self, f"k_proj{s}", nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True))
            setattr(self, f"v_proj{s}", nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True))
            setattr(self, f"o_proj{s}", nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False))
            setattr(self, f"q_norm{s}", RMSNorm(self.head_dim, cfg.rms_norm_eps))
            setattr(self, f"k_norm{s}", RMSNorm(self.head_dim, cfg.rms_norm_eps))

    def qkv(self, x: torch.Tensor, s: str) -> torch.Tensor:
        """q/k/v of rows `x` through the projections and QK-norms with suffix `s` ('' or GEN), [n, q+k+v] fp32."""
        q = getattr(self, f"q_proj{s}")(x).view(-1, self.heads, self.head_dim)
        k = getattr(self, f"k_proj{s}")(x).view(-1, self.kv_heads, self.head_dim)
        v = getattr(self, f"v_proj{s}")(x).view(-1, self.kv_heads, self.head_dim)
        # QK-norm runs in fp32 before the rotary (upstream's gen mode upcasts q/k first)
        q = getattr(self, f"q_norm{s}")(q.float())
        k = getattr(self, f"k_norm{s}")(k.float())
        return torch.cat([q.flatten(1), k.flatten(1), v.float().flatten(1)], dim=-1)

    def project(self, x, cos_sin, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows -> rotated q [n, Hq, d], k / v [n, Hkv, d] at x's dtype (each row by its expert)."""
        qd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = route(x, routing, lambda r: self.qkv(r, ""), lambda r: self.qkv(r, GEN))
        q = qkv[:, :qd].view(-1, self.heads, self.head_dim)
        k = qkv[:, qd : qd + kd].view(-1, self.kv_heads, self.head_dim)
        v = qkv[:, qd + kd :].view(-1, self.kv_heads, self.head_dim)
        cos, sin = cos_sin
        dtype = x.dtype
        return apply_rope(q, cos.float(), sin.float()).to(dtype), apply_rope(k, cos.float(), sin.float()).to(dtype), v.to(dtype)

    def output(self, out: torch.Tensor, routing: Routing) -> torch.Tensor:
        return route(out, routing, self.o_proj, lambda r: self.o_proj_moe_gen(r))

    def forward(self, x, cos_sin, routing: Routing, cache: KVCache | None, causal: bool, update_cache: bool):
        q, k, v = self.project(x, cos_sin, routing)
        return self.output(attend(q, k, v, cache, self.layer, causal=causal, update_cache=update_cache), routing)


class MoTLayer(nn.Module):
    """Pre-norm decoder layer with per-expert norms and MLPs."""

    def __init__(self, cfg: LLMConfig, layer: int, with_gen: bool):
        super().__init__()
        self.self_attn = MoTAttention(cfg, layer, with_gen)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if with_gen:
            self.mlp_moe_gen = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
            self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    # Three stages: the two around the KV cache are pure tensor functions, which is what
    # `runtime.compile` compiles (the cache is per-layer Python state, kept out of the graphs so
    # one graph serves every layer).
    def forward(self, x, cos_sin, routing: Routing, cache, causal: bool, update_cache: bool):
        q, k, v = self.pre_attention(x, cos_sin, routing)
        out = attend(q, k, v, cache, self.self_attn.layer, causal=causal, update_cache=update_cache)
        return self.post_attention(x, out, routing)

    def pre_attention(self, x, cos_sin, routing: Routing):
        h = route(x, routing, self.input_layernorm, lambda r: self.input_layernorm_moe_gen(r))
        return self.self_attn.project(h, cos_sin, routing)

    def post_attention(self, x, out, routing: Routing):
        x = x + self.self_attn.output(out, routing)
        h = route(
            x, routing,
            lambda r: self.mlp(self.post_attention_layernorm(r)),
            lambda r: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(r)),
        )
        return x + h


class Backbone(nn.Module):
    """`language_model.model`: embeddings, layers, and one final norm per expert."""

    def __init__(self, cfg: LLMConfig, with_gen: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTLayer(cfg, i, with_gen) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if with_gen:
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    # An optional `runtime.pager.LayerPager` (a plain object, not a submodule): when set, the
    # loop asks it to bring each layer's streamed weights in before the layer runs. Called
    # explicitly rather than through forward hooks so the resident path stays hook-free.
    pager = None

    def forward(self, x, cos_sin, routing: Routing, cache: KVCache | None, *, causal: bool, update_cache: bool):
        """Run one query chunk through every layer; returns final-normed hidden [n, D]."""
        pager = self.pager
        if pager is None:
            for layer in self.layers:
                x = layer(x, cos_sin, routing, cache, causal, update_cache)
        else:
            use_gen = routing.is_mixed  # a chunk with no gen rows needs none of the gen groups
            for i, layer in enumerate(self.layers):
                pager.before_layer(i, use_gen)
                x = layer(x, cos_sin, routing, cache, causal, update_cache)
                pager.after_layer(i)
        return route(x, routing, self.norm, lambda r: self.norm_moe_gen(r))


class LanguageModel(nn.Module):
    """`language_model`: the backbone plus the untied lm_head."""

    def __init__(self, cfg: LLMConfig, with_gen: bool, with_lm_head: bool):
        super().__init__()
        self.model = Backbone(cfg, with_gen)
        if with_lm_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
