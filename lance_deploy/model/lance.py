"""Lance's language-side model: the MoT backbone plus the latent bridges.

`LanceLM` owns every LLM-file tensor except the ViT (loaded separately) and the
stored `latent_pos_embed` table (regenerated on the fly, as upstream ignores it).
"""

from __future__ import annotations

import torch
from torch import nn

from lance_deploy.config import LLMConfig
from lance_deploy.model.attention import KVCache
from lance_deploy.model.layers import TimestepEmbedder, latent_position_embedding
from lance_deploy.model.mot import LanguageModel, Routing
from lance_deploy.model.rope import mrope_cos_sin

LATENT_CHANNELS = 48
MAX_LATENT_SIZE = 64


class LanceLM(nn.Module):
    """MoT backbone + lm_head + time embedder + vae2llm/llm2vae, named as in the release."""

    def __init__(self, cfg: LLMConfig, *, with_gen: bool = True, with_lm_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.with_gen = with_gen
        self.language_model = LanguageModel(cfg, with_gen, with_lm_head)
        if with_gen:
            self.time_embedder = TimestepEmbedder(cfg.hidden_size)
            self.vae2llm = nn.Linear(LATENT_CHANNELS, cfg.hidden_size)
            self.llm2vae = nn.Linear(cfg.hidden_size, LATENT_CHANNELS)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.norm.weight.device

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_hidden_layers)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [n] -> [n, D] (embedding rows may live on another device)."""
        table = self.language_model.model.embed_tokens.weight
        return table[ids.to(table.device)].to(self.device, self.dtype)

    def embed_latents(self, x: torch.Tensor, t: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Latent rows [n, 48] with flow times [n] -> [n, D]; grids give each block's (t, h, w)."""
        pos = torch.cat([latent_position_embedding(g, self.cfg.hidden_size, MAX_LATENT_SIZE, x.device) for g in grids])
        h = self.vae2llm(x.to(self.dtype)) + self.time_embedder(t)
        return (h.float() + pos).to(self.dtype)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden of latent rows -> flow velocity (noise - data), [n, 48]."""
        return self.llm2vae(hidden).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden).float()

    def forward_chunk(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache | None,
        *,
        causal: bool,
        gen_rows: torch.Tensor | None = None,
        update_cache: bool = True,
    ) -> torch.Tensor:
        """One query chunk [n, D] at MRoPE positions [3, n] against the cache -> final hidden [n, D]."""
        cfg = self.cfg
        cos_sin = mrope_cos_sin(pos.to(x.device), cfg.head_dim, cfg.rope_theta, cfg.mrope_section, torch.float32)
        routing = Routing.of(x.shape[0], gen_rows, x.device)
        return self.language_model.model(x, cos_sin, routing, cache, causal=causal, update_cache=update_cache)
