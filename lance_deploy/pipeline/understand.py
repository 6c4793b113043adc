"""Greedy understanding (x2t): prefill the prompt split by split, then decode.

Only the understanding expert, the embeddings and the lm_head are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lance_deploy.model.lance import LanceLM


@dataclass
class UnderstandInputs:
    """A rendered x2t prompt; positions cover the prompt plus the decode budget."""

    prompt_ids: torch.Tensor  # [P]
    split_lens: list[int]  # splits of the prompt (a trailing part not covered is prefilled causally)
    attn_modes: list[str]
    rope_pos: torch.Tensor  # [3, P + max_new_tokens]
    vit_indexes: torch.Tensor | None = None
    vit_tokens: torch.Tensor | None = None  # [n_vit, D]


@dataclass
class UnderstandResult:
    token_ids: list[int]
    logits: list = field(default_factory=list)  # raw [vocab] rows, before the -inf mask


@torch.no_grad()
def understand(
    model: LanceLM, inp: UnderstandInputs, *, max_new_tokens: int, eos_id: int, vocab_limit: int,
    keep_logits: bool = False, progress=None, on_phase=None, on_token=None,
) -> UnderstandResult:
    """Greedy decode up to `max_new_tokens` ids (stops after emitting `eos_id`).

    Ids >= `vocab_limit` (= len(tokenizer)) are never chosen, as upstream masks them.
    `on_phase(name)` is called with "prefill" and then "text_decode" (residency swaps).
    """
    on_phase = on_phase or (lambda name: None)
    on_phase("prefill")
    ids = inp.prompt_ids
    context = ids.numel() - 1  # the last prompt token is the first decode query
    seq = model.embed_tokens(ids[:context])
    if inp.vit_tokens is not None and inp.vit_indexes is not None and inp.vit_indexes.numel():
        seq[inp.vit_indexes] = inp.vit_tokens.to(seq.dtype)
    cache = model.new_cache()
    start = 0
    for n, mode in zip(inp.split_lens, inp.attn_modes):
        end = min(start + n, context)
        if end > start:
            model.forward_chunk(seq[start:end], inp.rope_pos[:, start:end], cache, causal=mode == "causal")
        start = end
    if start < context:
        model.forward_chunk(seq[start:context], inp.rope_pos[:, start:context], cache, causal=True)

    on_phase("text_decode")
    result = UnderstandResult(token_ids=[])
    token = ids[context:]
    for step in range(max_new_tokens):
        pos = inp.rope_pos[:, context + step : context + step + 1]
        h = model.forward_chunk(model.embed_tokens(token), pos, cache, causal=True)
        logits = model.logits(h)[0]
        if keep_logits:
            result.logits.append(logits.clone())
        masked = logits.clone()
        masked[vocab_limit:] = float("-inf")
        next_id = int(masked.argmax())
        result.token_ids.append(next_id)
        if on_token is not None:  # before the eos check: the caller sees every id, eos included
            on_token(next_id)
        if progress is not None:
            progress(step)
        if next_id == eos_id:
            break
        token = torch.tensor([next_id], device=ids.device)
    return result
