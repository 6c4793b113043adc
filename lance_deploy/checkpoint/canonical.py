"""Canonical tensor names: the one table between release keys and the names recipes, plans,
manifests and the runtime use.

Release keys spell the two experts differently (``self_attn.q_proj_moe_gen.weight`` but
``mlp_moe_gen.gate_proj.weight``), so rules written against them need a decoder ring. The
canonical names put expert and layer in fixed slots, gguf-style::

    blk.{L}.{und|gen}.{attn_q,attn_k,attn_v,attn_o,ffn_gate,ffn_up,ffn_down}   Linear weights
    blk.{L}.{und|gen}.{attn_q,attn_k,attn_v}.bias                              their biases
    blk.{L}.{und|gen}.{attn_norm,ffn_norm,q_norm,k_norm}                       RMSNorm weights
    embed_tokens  lm_head  out_norm.{und|gen}
    time_embedder.{in,out}[.bias]  vae2llm[.bias]  llm2vae[.bias]  latent_pos_embed
    vit.<standalone ViT key>        (bundled ``vit_model.X`` and standalone ``X`` both -> ``vit.X``)
    vae.<Wan2.2_VAE.pth key>

Only the tables below (the layer table built from ``model/tree.py``) and the two prefix maps know
release spellings.
"""

from __future__ import annotations

import re

from lance_deploy.checkpoint import names
from lance_deploy.core.errors import CheckpointError
from lance_deploy.model import tree

EXPERTS = tree.EXPERTS

# canonical leaf -> release key inside ``language_model.model.layers.{L}.`` for each expert: our
# module names are the release keys, so the layer's module tree (``model/tree.py``) spells them.
LAYER_TABLE: dict[str, dict[str, str]] = {
    leaf: {expert: tree.leaf_tensor(leaf, expert) for expert in EXPERTS} for leaf in tree.LEAVES}

GLOBAL_TABLE: dict[str, str] = {
    "embed_tokens": "language_model.model.embed_tokens.weight",
    "lm_head": "language_model.lm_head.weight",
    "out_norm.und": "language_model.model.norm.weight",
    "out_norm.gen": "language_model.model.norm_moe_gen.weight",
    "time_embedder.in": "time_embedder.mlp.0.weight", "time_embedder.in.bias": "time_embedder.mlp.0.bias",
    "time_embedder.out": "time_embedder.mlp.2.weight", "time_embedder.out.bias": "time_embedder.mlp.2.bias",
    "vae2llm": "vae2llm.weight", "vae2llm.bias": "vae2llm.bias",
    "llm2vae": "llm2vae.weight", "llm2vae.bias": "llm2vae.bias",
    "latent_pos_embed": names.LATENT_POS_KEY,
}  # fmt: skip

IGNORED = frozenset({"latent_pos_embed"})
"""Stored in the release but regenerated at load (upstream pops it): never quantized or shipped."""

LAYER_LINEARS = tree.LINEARS
GLOBAL_LINEARS = frozenset({"lm_head", "time_embedder.in", "time_embedder.out", "vae2llm", "llm2vae"})

_VIT_ROOTS = ("blocks.", "patch_embed.", "merger.")  # keys of the standalone vit.safetensors
_VAE_ROOTS = ("encoder.", "decoder.", "conv1.", "conv2.")  # keys of Wan2.2_VAE.pth
# ViT Linears: attention qkv/proj, the SwiGLU MLP, and the merger MLP (patch_embed is a Conv3d).
_VIT_LINEAR = re.compile(r"vit\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down)_proj)|merger\.mlp\.[02])\.weight")
_BLK = re.compile(r"blk\.(\d+)\.(und|gen)\.(.+)")

_FROM_LAYER = {release: (expert, leaf) for leaf, keys in LAYER_TABLE.items() for expert, release in keys.items()}
_FROM_GLOBAL = {release: canonical for canonical, release in GLOBAL_TABLE.items()}


def to_canonical(release_key: str) -> str:
    """Canonical name of a release key (model.safetensors, standalone ViT or VAE .pth key)."""
    if release_key.startswith(tree.LAYERS):
        layer, _, rest = release_key[len(tree.LAYERS):].partition(".")
        hit = _FROM_LAYER.get(rest)
        if layer.isdigit() and hit is not None:
            return f"blk.{int(layer)}.{hit[0]}.{hit[1]}"
    elif release_key in _FROM_GLOBAL:
        return _FROM_GLOBAL[release_key]
    elif release_key.startswith(names.VIT_PREFIX):
        return "vit." + release_key[len(names.VIT_PREFIX):]
    elif release_key.startswith(_VIT_ROOTS):
        return "vit." + release_key
    elif release_key.startswith(_VAE_ROOTS):
        return "vae." + release_key
    raise CheckpointError(f"release key {release_key!r} has no canonical name "
                          "(not a Lance LLM, bridge, ViT or VAE key)")


def to_release(canonical: str, vit_prefix: str = names.VIT_PREFIX) -> str:
    """Release key of a canonical name. ViT names get ``vit_prefix`` ('vit_model.' for the copy
    bundled in model.safetensors, '' for the standalone vit.safetensors)."""
    m = _BLK.fullmatch(canonical)
    if m and m.group(3) in LAYER_TABLE:
        return tree.layer_prefix(int(m.group(1))) + LAYER_TABLE[m.group(3)][m.group(2)]
    if canonical in GLOBAL_TABLE:
        return GLOBAL_TABLE[canonical]
    if canonical.startswith("vit.") and len(canonical) > 4:
        return vit_prefix + canonical[4:]
    if canonical.startswith("vae.") and len(canonical) > 4:
        return canonical[4:]
    raise CheckpointError(f"{canonical!r} is not a canonical tensor name (see lance_deploy/checkpoint/canonical.py)")


def expert_of(canonical: str) -> str | None:
    """'und' or 'gen' for decoder-layer tensors and the final norms; None for shared tensors."""
    m = _BLK.fullmatch(canonical)
    if m:
        return m.group(2)
    if canonical in ("out_norm.und", "out_norm.gen"):
        return canonical[-3:]
    return None


def layer_of(canonical: str) -> int | None:
    """Decoder-layer index of a ``blk.*`` name; None for everything else (ViT blocks included)."""
    m = _BLK.fullmatch(canonical)
    return int(m.group(1)) if m else None


def leaf_of(canonical: str) -> str | None:
    """The per-layer part of a ``blk.*`` name ('attn_q', 'attn_q.bias', 'ffn_norm', ...)."""
    m = _BLK.fullmatch(canonical)
    return m.group(3) if m else None


def module_path(canonical: str) -> str:
    """The module inside a ``MoTLayer`` that holds a ``blk.*`` tensor ('blk.3.gen.ffn_up' -> 'mlp_moe_gen.up_proj')."""
    m = _BLK.fullmatch(canonical)
    if not m or m.group(3) not in tree.LEAVES:
        raise CheckpointError(f"{canonical!r} is not a decoder-layer tensor name (blk.L.und|gen.<leaf>)")
    return tree.leaf_module(m.group(3), m.group(2))


def is_linear_weight(canonical: str) -> bool:
    """True for the weight of an nn.Linear: the tensors recipe rules must cover.

    Embeddings, norms, biases, conv kernels (ViT patch embed, VAE) and the latent table are not.
    """
    leaf = leaf_of(canonical)
    if leaf is not None:
        return leaf in LAYER_LINEARS
    return canonical in GLOBAL_LINEARS or bool(_VIT_LINEAR.fullmatch(canonical))


def component_of(canonical: str) -> str:
    """Component (``names.COMPONENTS`` vocabulary: und_expert, gen_expert, bridges, vit, ...)."""
    return names.component_of(to_release(canonical))


_LEAF_ORDER = {leaf: i for i, leaf in enumerate(LAYER_TABLE)}
_GLOBAL_ORDER = {name: i for i, name in enumerate(GLOBAL_TABLE)}


def sort_key(canonical: str) -> tuple:
    """Display / storage order: shared LLM tensors, then layer by layer (und before gen, leaves in
    LAYER_TABLE order), then the ViT, then the VAE."""
    m = _BLK.fullmatch(canonical)
    if m:
        return (1, int(m.group(1)), EXPERTS.index(m.group(2)), _LEAF_ORDER.get(m.group(3), 99), canonical)
    if canonical in _GLOBAL_ORDER:
        return (0, 0, 0, _GLOBAL_ORDER[canonical], canonical)
    return (2 if canonical.startswith("vit.") else 3, 0, 0, 0, canonical)


def canonical_shapes(release_shapes: dict[str, tuple[int, ...]],
                     vit_prefix: str | None = None) -> dict[str, tuple[int, ...]]:
    """Rename a release key -> shape table; ``vit_prefix`` (e.g. '') marks a standalone ViT file,
    whose keys are renamed as ViT keys whatever their roots."""
    if vit_prefix is not None:
        return {"vit." + k[len(vit_prefix):]: tuple(v) for k, v in release_shapes.items()}
    return {to_canonical(k): tuple(v) for k, v in release_shapes.items()}


def layout_shapes(layout, include_vae: bool = True) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor a model uses, from headers only.

    ``layout`` is a ``ReleaseLayout``: model.safetensors, then the standalone ViT when none is
    bundled (the bundled copy wins, as upstream loads it last), then the VAE's pickle index
    (``torch.load(mmap=True)`` reads no tensor data).
    """
    from lance_deploy.checkpoint.loader import load_vae_state_dict
    from lance_deploy.checkpoint.safetensors_io import SafetensorsReader

    with SafetensorsReader(layout.weights_file) as r:
        shapes = canonical_shapes({k: i.shape for k, i in r.infos().items()})
    if not layout.has_bundled_vit and layout.vit_file is not None:
        with SafetensorsReader(layout.vit_file) as r:
            shapes.update(canonical_shapes({k: i.shape for k, i in r.infos().items()}, vit_prefix=""))
    if include_vae and layout.vae_file is not None:
        sd = load_vae_state_dict(layout.vae_file)
        shapes.update({"vae." + k: tuple(t.shape) for k, t in sd.items()})
    return shapes
