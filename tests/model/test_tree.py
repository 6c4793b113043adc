"""The module tree names exactly the tensors our modules have, for both experts."""

from __future__ import annotations

import torch
from torch import nn

from lance_deploy.checkpoint import canonical as cn
from lance_deploy.config import TINY_LLM
from lance_deploy.model.layers import RMSNorm
from lance_deploy.model.lance import LanceLM
from lance_deploy.model.mot import MoTLayer
from lance_deploy.model.tree import (
    EXPERTS,
    FOLD_GROUPS,
    INPUT_GROUPS,
    LEAVES,
    LINEARS,
    expert_of,
    layer_prefix,
    leaf_module,
    leaf_tensor,
    twin,
)


def test_leaves_are_every_tensor_of_a_layer():
    with torch.device("meta"):
        layer = MoTLayer(TINY_LLM, 0, with_gen=True)
        und_only = MoTLayer(TINY_LLM, 0, with_gen=False)
    assert sorted(leaf_tensor(leaf, e) for leaf in LEAVES for e in EXPERTS) == sorted(layer.state_dict())
    assert sorted(leaf_tensor(leaf, "und") for leaf in LEAVES) == sorted(und_only.state_dict())
    for leaf in LEAVES:
        for e in EXPERTS:
            assert expert_of(leaf_tensor(leaf, e)) == e
            module = layer.get_submodule(leaf_module(leaf, e))
            is_linear_weight = isinstance(module, nn.Linear) and LEAVES[leaf][1] == "weight"
            assert is_linear_weight == (leaf in LINEARS), leaf


def test_input_groups_and_their_norms():
    with torch.device("meta"):
        layer = MoTLayer(TINY_LLM, 0, with_gen=True)
    assert sorted(leaf for g in INPUT_GROUPS.values() for leaf in g.linears) == sorted(LINEARS)
    for e in EXPERTS:
        for group in INPUT_GROUPS.values():
            widths = {layer.get_submodule(p).in_features for p in group.paths(e)}
            assert len(widths) == 1 and group.probe(e) == group.paths(e)[0]
        for group in FOLD_GROUPS:  # the norm whose output the group reads is as wide as that input
            norm = layer.get_submodule(leaf_module(group.norm, e))
            assert isinstance(norm, RMSNorm) and norm.weight.shape[0] == layer.get_submodule(group.probe(e)).in_features


def test_release_keys_are_our_module_names():
    with torch.device("meta"):
        lm = LanceLM(TINY_LLM, with_gen=True, with_lm_head=True)
    keys = set(lm.state_dict())
    layer_keys = {layer_prefix(i) + leaf_tensor(leaf, e)
                  for i in range(TINY_LLM.num_hidden_layers) for leaf in LEAVES for e in EXPERTS}
    assert layer_keys <= keys
    assert {cn.to_release(cn.to_canonical(k)) for k in layer_keys} == layer_keys
    assert f"language_model.model.{twin('norm')}.weight" == cn.to_release("out_norm.gen") and cn.to_release(
        "out_norm.gen") in keys
    assert cn.module_path("blk.1.gen.attn_v") == "self_attn.v_proj_moe_gen" and twin("mlp.up_proj", "und") == "mlp.up_proj"
