"""The release key table and key classification.

Shapes come from the config (lance.md §2.2 for the LLM, §3 for the ViT, §4 and
the golden ``Wan2.2_VAE.pth`` for the VAE), so the same code describes the tiny
golden checkpoints and the 24.7 GB release.
"""

from __future__ import annotations

import re
from typing import Mapping, Union

from lance_deploy.config import LLMConfig, VisionConfig
from lance_deploy.core.errors import CheckpointError
from lance_deploy.model.tree import GEN as GEN_SUFFIX

Shapes = dict[str, tuple[int, ...]]

LLM_PREFIX = "language_model."
VIT_PREFIX = "vit_model."
LATENT_POS_KEY = "latent_pos_embed.pos_embed"
"""Upstream pops this key at load and regenerates the table: its stored row count is ignored."""

MAX_LATENT_SIZE = 64
LATENT_ROWS = {"image": 1 * MAX_LATENT_SIZE ** 2, "video": 31 * MAX_LATENT_SIZE ** 2}
"""Release row counts of the stored latent table (4096 / 126,976)."""

COMPONENTS = ("und_expert", "gen_expert", "embed_tokens", "lm_head", "bridges", "latent_pos_embed",
              "vit", "vae_encoder", "vae_decoder")
"""Every value ``component_of`` returns except 'other', in display order."""

RELEASE_DTYPES = ("F32", "BF16")
"""Every tensor of the release (model, ViT and VAE files) is stored in one of these; an integer tag
on a release key is a relabelled or foreign file, even when its byte length fits."""


def _expert_layer(cfg: LLMConfig, suffix: str) -> Shapes:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    kv = cfg.num_key_value_heads * d
    q = cfg.num_attention_heads * d
    s: Shapes = {}
    for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        s[f"self_attn.{proj}{suffix}.weight"] = (out, h)
        s[f"self_attn.{proj}{suffix}.bias"] = (out,)
    s[f"self_attn.o_proj{suffix}.weight"] = (h, q)
    s[f"self_attn.q_norm{suffix}.weight"] = (d,)
    s[f"self_attn.k_norm{suffix}.weight"] = (d,)
    s[f"mlp{suffix}.gate_proj.weight"] = (i, h)
    s[f"mlp{suffix}.up_proj.weight"] = (i, h)
    s[f"mlp{suffix}.down_proj.weight"] = (h, i)
    s[f"input_layernorm{suffix}.weight"] = (h,)
    s[f"post_attention_layernorm{suffix}.weight"] = (h,)
    return s


def expected_llm_shapes(cfg: LLMConfig, variant: str = "image", latent_rows: int | None = None) -> Shapes:
    """The 1021 LLM/bridge keys of ``model.safetensors`` (no ``vit_model.*``)."""
    if variant not in LATENT_ROWS:
        raise ValueError(f"variant must be 'image' or 'video', not {variant!r}")
    h, v = cfg.hidden_size, cfg.vocab_size
    s: Shapes = {}
    for layer in range(cfg.num_hidden_layers):
        for suffix in ("", GEN_SUFFIX):
            for k, shape in _expert_layer(cfg, suffix).items():
                s[f"language_model.model.layers.{layer}.{k}"] = shape
    s["language_model.model.embed_tokens.weight"] = (v, h)
    s["language_model.lm_head.weight"] = (v, h)
    s["language_model.model.norm.weight"] = (h,)
    s["language_model.model.norm_moe_gen.weight"] = (h,)
    s["time_embedder.mlp.0.weight"] = (h, 256)  # 256-dim sinusoid of t
    s["time_embedder.mlp.0.bias"] = (h,)
    s["time_embedder.mlp.2.weight"] = (h, h)
    s["time_embedder.mlp.2.bias"] = (h,)
    s["vae2llm.weight"] = (h, 48)  # 48 latent channels, latent patch 1x1x1
    s["vae2llm.bias"] = (h,)
    s["llm2vae.weight"] = (48, h)
    s["llm2vae.bias"] = (48,)
    s[LATENT_POS_KEY] = (latent_rows if latent_rows is not None else LATENT_ROWS[variant], h)
    return s


def expected_vit_shapes(vcfg: VisionConfig) -> Shapes:
    """The 390 (release) keys of the standalone ViT, without the ``vit_model.`` prefix."""
    h, i, m = vcfg.hidden_size, vcfg.intermediate_size, vcfg.hidden_size * vcfg.spatial_merge_size ** 2
    p, tp = vcfg.patch_size, vcfg.temporal_patch_size
    s: Shapes = {"patch_embed.proj.weight": (h, vcfg.in_chans, tp, p, p)}
    for b in range(vcfg.depth):
        pre = f"blocks.{b}."
        s[pre + "norm1.weight"] = (h,)
        s[pre + "norm2.weight"] = (h,)
        s[pre + "attn.qkv.weight"], s[pre + "attn.qkv.bias"] = (3 * h, h), (3 * h,)
        s[pre + "attn.proj.weight"], s[pre + "attn.proj.bias"] = (h, h), (h,)
        for proj in ("gate_proj", "up_proj"):
            s[pre + f"mlp.{proj}.weight"], s[pre + f"mlp.{proj}.bias"] = (i, h), (i,)
        s[pre + "mlp.down_proj.weight"], s[pre + "mlp.down_proj.bias"] = (h, i), (h,)
    s["merger.ln_q.weight"] = (h,)
    s["merger.mlp.0.weight"], s["merger.mlp.0.bias"] = (m, m), (m,)
    s["merger.mlp.2.weight"], s["merger.mlp.2.bias"] = (vcfg.out_hidden_size, m), (vcfg.out_hidden_size,)
    return s


def expected_lance_shapes(cfg: LLMConfig, variant: str, latent_rows: int | None = None) -> Shapes:
    """All keys of a release ``model.safetensors``: 1021 for 'image', + 390 ``vit_model.*`` for 'video'.

    ``latent_rows`` only sets the row count reported for ``latent_pos_embed.pos_embed``
    (default: the release's); ``check_keys`` ignores that dimension anyway.
    """
    s = expected_llm_shapes(cfg, variant, latent_rows)
    if variant == "video":
        s.update({VIT_PREFIX + k: v for k, v in expected_vit_shapes(cfg.vision).items()})
    return s


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")


def component_of(name: str) -> str:
    """Which part of Lance a key belongs to (one of ``COMPONENTS``, or 'other').

    Works for keys of ``model.safetensors``, of the standalone ViT (no prefix)
    and of ``Wan2.2_VAE.pth``. Final norms fold into their expert; the VAE's
    1x1x1 ``conv1`` (after the encoder head) counts as encoder, ``conv2`` (before
    the decoder) as decoder.
    """
    if name.startswith(LLM_PREFIX):
        if name.startswith("language_model.model.embed_tokens."):
            return "embed_tokens"
        if name.startswith("language_model.lm_head."):
            return "lm_head"
        if name.startswith(("language_model.model.layers.", "language_model.model.norm")):
            return "gen_expert" if GEN_SUFFIX in name else "und_expert"
        return "other"
    if name.startswith(("time_embedder.", "vae2llm.", "llm2vae.")):
        return "bridges"
    if name.startswith("latent_pos_embed."):
        return "latent_pos_embed"
    if name.startswith((VIT_PREFIX, "blocks.", "patch_embed.", "merger.")):
        return "vit"
    if name.startswith(("encoder.", "conv1.")):
        return "vae_encoder"
    if name.startswith(("decoder.", "conv2.")):
        return "vae_decoder"
    return "other"


def layer_of(name: str) -> int | None:
    """Decoder-layer index of an LLM key (ViT keys: block index); None for non-layer keys."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


ShapeSource = Union["SafetensorsReader", Mapping[str, tuple[int, ...]]]  # noqa: F821


def _shapes_of(source) -> dict[str, tuple[int, ...]]:
    if hasattr(source, "infos"):  # SafetensorsReader: header only, no tensor data
        return {k: i.shape for k, i in source.infos().items()}
    return {k: tuple(getattr(v, "shape", v)) for k, v in source.items()}


def _dtypes_of(source) -> dict[str, str]:
    """Stored dtype tags where the source knows them (a reader's header, or real tensors)."""
    if hasattr(source, "infos"):
        return {k: i.dtype for k, i in source.infos().items()}
    from lance_deploy.checkpoint.safetensors_io import dtype_tag

    return {k: dtype_tag(v.dtype) for k, v in source.items() if hasattr(v, "dtype")}


def dtype_mismatches(actual: ShapeSource, expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Release keys stored in a dtype the release never uses (``RELEASE_DTYPES``)."""
    return [f"{k} is stored as {tag}, expected {' or '.join(RELEASE_DTYPES)}"
            for k, tag in _dtypes_of(actual).items() if k in expected and tag not in RELEASE_DTYPES]


def key_mismatches(actual: ShapeSource, expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Human-readable differences between a key->shape table and the expected one (and, for a
    reader or real tensors, stored dtypes outside ``RELEASE_DTYPES``)."""
    have = _shapes_of(actual)
    out = [f"missing {k}" for k in expected if k not in have]
    out += [f"unexpected {k}" for k in have if k not in expected]
    for k, want in expected.items():
        got = have.get(k)
        if got is None:
            continue
        # The stored latent table's row count varies (4096 / 126,976 / cut-down fixtures): ignored.
        same = got[1:] == tuple(want)[1:] and len(got) == len(want) if k == LATENT_POS_KEY else got == tuple(want)
        if not same:
            out.append(f"{k} has shape {list(got)}, expected {list(want)}")
    return out + dtype_mismatches(actual, expected)


def check_keys(actual: ShapeSource, expected: Mapping[str, tuple[int, ...]], source: str, limit: int = 4) -> None:
    """Raise ``CheckpointError`` naming the first few missing / unexpected / wrong-shape keys.

    ``actual`` is a ``SafetensorsReader`` or a mapping of key -> shape (or -> tensor);
    ``source`` names the file in the message.
    """
    bad = key_mismatches(actual, expected)
    if not bad:
        return
    more = f"; ... and {len(bad) - limit} more" if len(bad) > limit else ""
    noun = "key does" if len(bad) == 1 else "keys do"
    raise CheckpointError(f"{source}: {len(bad)} {noun} not match the release layout: "
                          + "; ".join(bad[:limit]) + more)
