"""The module tree of a MoT decoder layer: what each tensor is called and which expert owns it.

Our modules are named like the release keys (``model/mot.py``), so this is also the one place
that spells the generation twin: ``_moe_gen`` goes on the layer's top-level module
(``mlp_moe_gen.up_proj``, ``input_layernorm_moe_gen``), except inside the shared attention,
where each projection and QK-norm carries it (``self_attn.q_proj_moe_gen``). The leaves are
the per-layer parts of the canonical names (``checkpoint/canonical.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

EXPERTS = ("und", "gen")
GEN = "_moe_gen"
LAYERS = "language_model.model.layers."
"""Where ``LanceLM`` keeps its decoder layers (and so the prefix of their release keys)."""
_SHARED = "self_attn"  # one module for both experts: its children carry the suffix

# canonical leaf -> (module path inside a layer of the understanding expert, tensor attribute)
LEAVES: dict[str, tuple[str, str]] = {
    "attn_q": ("self_attn.q_proj", "weight"), "attn_q.bias": ("self_attn.q_proj", "bias"),
    "attn_k": ("self_attn.k_proj", "weight"), "attn_k.bias": ("self_attn.k_proj", "bias"),
    "attn_v": ("self_attn.v_proj", "weight"), "attn_v.bias": ("self_attn.v_proj", "bias"),
    "attn_o": ("self_attn.o_proj", "weight"),
    "ffn_gate": ("mlp.gate_proj", "weight"), "ffn_up": ("mlp.up_proj", "weight"),
    "ffn_down": ("mlp.down_proj", "weight"),
    "attn_norm": ("input_layernorm", "weight"), "ffn_norm": ("post_attention_layernorm", "weight"),
    "q_norm": ("self_attn.q_norm", "weight"), "k_norm": ("self_attn.k_norm", "weight"),
}  # fmt: skip

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")
"""The leaves that are nn.Linear weights."""


def layer_prefix(index: int) -> str:
    """Prefix of decoder layer ``index``'s tensors in ``LanceLM`` and in the release checkpoint."""
    return f"{LAYERS}{index}."


def twin(und_path: str, expert: str = "gen") -> str:
    """The module path of ``expert``'s copy of an und module path ('mlp.up_proj' -> 'mlp_moe_gen.up_proj').

    Works for layer paths and for the backbone's final norm ('norm' -> 'norm_moe_gen')."""
    if expert == "und":
        return und_path
    head, _, tail = und_path.partition(".")
    if head == _SHARED and tail:
        return f"{head}.{tail}{GEN}"
    return f"{head}{GEN}" + (f".{tail}" if tail else "")


def expert_of(path: str) -> str:
    """'gen' for a dotted module, parameter or release name of the generation twin, else 'und'."""
    return "gen" if GEN in path else "und"


def leaf_module(leaf: str, expert: str) -> str:
    """Module path inside a layer of a canonical leaf ('ffn_up', 'gen' -> 'mlp_moe_gen.up_proj')."""
    return twin(LEAVES[leaf][0], expert)


def leaf_tensor(leaf: str, expert: str) -> str:
    """Tensor name inside a layer of a canonical leaf ('attn_q.bias', 'gen' -> 'self_attn.q_proj_moe_gen.bias')."""
    return f"{leaf_module(leaf, expert)}.{LEAVES[leaf][1]}"


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input. ``norm`` is the RMSNorm leaf producing that input (AWQ /
    SmoothQuant scales can fold into it), None when the input is not a norm's output."""

    linears: tuple[str, ...]
    norm: str | None = None

    def paths(self, expert: str) -> list[str]:
        """Module paths of the members inside a layer, for one expert."""
        return [leaf_module(leaf, expert) for leaf in self.linears]

    def probe(self, expert: str) -> str:
        """Module path of the member whose input hook observes the group (its siblings read the same input)."""
        return leaf_module(self.linears[0], expert)


INPUT_GROUPS: dict[str, InputGroup] = {
    "attn_in": InputGroup(("attn_q", "attn_k", "attn_v"), norm="attn_norm"),
    "attn_out": InputGroup(("attn_o",)),
    "mlp_in": InputGroup(("ffn_gate", "ffn_up"), norm="ffn_norm"),
    "mlp_out": InputGroup(("ffn_down",)),
}

FOLD_GROUPS = tuple(g for g in INPUT_GROUPS.values() if g.norm is not None)
"""The input groups behind an RMSNorm: q/k/v after ``attn_norm``, gate/up after ``ffn_norm``."""


def fold_group_of(leaf: str) -> InputGroup | None:
    return next((g for g in FOLD_GROUPS if leaf in g.linears), None)
