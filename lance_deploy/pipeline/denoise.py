"""The KV-cached denoising loop of Lance generation (t2i, t2v, i2v, edits).

Prefill every split before the noisy target into a cache (and, for text CFG, a
second cache without the caption split, at the conditional positions, as upstream
does; with a negative prompt, the prefix of the negative sequence at its own
positions); then at each step run the target split `[vision_start, latents, vision_end]`
as one bidirectional query against each cache without writing to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lance_deploy.core.errors import LanceError
from lance_deploy.model.lance import LanceLM
from lance_deploy.pipeline.sampler import SamplerConfig, flow_schedule, guide

CAPTION_MODALITY = 0


@dataclass
class DenoiseInputs:
    """Everything the loop needs about one sample; index tensors are sequence positions."""

    token_ids: torch.Tensor  # [L]
    split_lens: list[int]
    attn_modes: list[str]
    token_modality: torch.Tensor  # [L]
    rope_pos: torch.Tensor  # [3, L], after MaPE
    uncond_rope_pos: torch.Tensor | None  # [3, Lu], recomputed on the caption-free sequence
    text_indexes: torch.Tensor
    vae_indexes: torch.Tensor  # row r of `latents` sits at vae_indexes[r]
    target_indexes: torch.Tensor  # the rows the sampler updates
    vae_grids: list[tuple[int, int, int]]  # latent (t, h, w) of each VAE block, in order
    latents: torch.Tensor  # [n_vae, 48]: noise on target rows, clean latents on condition rows
    vit_indexes: torch.Tensor | None = None
    vit_tokens: torch.Tensor | None = None  # [n_vit, D]
    # The CFG branch as a sequence of its own (a negative prompt): same blocks, same latents and ViT
    # tokens, its own token ids, splits and positions. None: upstream's caption-free branch above.
    negative: DenoiseInputs | None = None


@dataclass
class DenoiseTrace:
    """Per-step tensors, recorded when asked for (parity tests, eval)."""

    x: list = field(default_factory=list)
    v_cond: list = field(default_factory=list)
    v_uncond: list = field(default_factory=list)
    v_guided: list = field(default_factory=list)


def _splits(inp: DenoiseInputs) -> list[tuple[int, int, str]]:
    out, start = [], 0
    for n, mode in zip(inp.split_lens, inp.attn_modes):
        out.append((start, start + n, mode))
        start += n
    return out


def _prefix_embeddings(model: LanceLM, inp: DenoiseInputs, end: int, t0: torch.Tensor) -> torch.Tensor:
    """Embeddings of sequence positions [0, end): text, ViT tokens and (clean) VAE latents."""
    seq = model.embed_tokens(inp.token_ids[:end])
    if inp.vit_tokens is not None and inp.vit_indexes is not None and inp.vit_indexes.numel():
        seq[inp.vit_indexes] = inp.vit_tokens.to(seq.dtype)
    rows = (inp.vae_indexes < end).nonzero().flatten()
    if rows.numel():
        # the latents live on the host; on a GPU the bridge would meet them there (the rehearsal found it)
        emb = model.embed_latents(inp.latents.to(t0.device), t0, inp.vae_grids)
        seq[inp.vae_indexes[rows]] = emb[rows]
    return seq


def _prefill(model: LanceLM, seq, inp: DenoiseInputs, splits, keep) -> "object":
    cache = model.new_cache()
    for start, end, mode in splits:
        if not keep(start):
            continue
        gen = ((inp.vae_indexes >= start) & (inp.vae_indexes < end)).nonzero().flatten()
        gen_rows = inp.vae_indexes[gen] - start if gen.numel() else None
        model.forward_chunk(seq[start:end], inp.rope_pos[:, start:end], cache, causal=mode == "causal",
                            gen_rows=gen_rows, update_cache=True)
    return cache


def _check_finite(x: torch.Tensor, where: str) -> None:
    """Stop on a NaN / Inf latent instead of decoding it into a black frame (one reduction a step)."""
    if not bool(torch.isfinite(x).all()):
        kind = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise LanceError(f"the latents hold {kind} {where}; the run was stopped. Try --dtype float32 or "
                         "bfloat16 (float16 overflows), a lower --cfg, or a less aggressive quantization recipe")


@torch.no_grad()
def denoise(
    model: LanceLM, inp: DenoiseInputs, sampler: SamplerConfig, progress=None, trace: DenoiseTrace | None = None,
    query_fn=None, on_phase=None,
) -> torch.Tensor:
    """Run the sampler; returns the final latents [n_vae, 48] (condition rows unchanged).

    `on_phase(name)`, if given, is called with "prefill" before the context is cached and with
    "denoise" before the first step (the residency manager swaps weights there).

    `query_fn(query, pos, cache)`, if given, replaces the step query's `forward_chunk` (e.g. the
    exported gen-layer graphs of `--backend onnxruntime`); the prefill always runs in PyTorch.
    """
    on_phase = on_phase or (lambda name: None)
    on_phase("prefill")
    splits = _splits(inp)
    target = next(i for i, s in enumerate(splits) if s[2] == "noise")
    t_start, t_end, _ = splits[target]
    device = model.device
    x = inp.latents.to(device, torch.float32).clone()
    vae_idx = inp.vae_indexes.to(device)
    update = torch.isin(vae_idx, inp.target_indexes.to(device))
    in_query = (vae_idx > t_start) & (vae_idx < t_end - 1)  # latent rows of the target split
    update_in_query = update[in_query]

    seq = _prefix_embeddings(model, inp, t_start, torch.zeros(x.shape[0], device=device))
    prefix = splits[:target]
    cache = _prefill(model, seq, inp, prefix, keep=lambda s: True)
    use_cfg = sampler.cfg_scale > 1.0 and (inp.uncond_rope_pos is not None or inp.negative is not None)
    uncond_cache = None
    n_query = t_end - t_start
    if use_cfg and inp.negative is not None:
        neg = inp.negative
        n_splits = _splits(neg)
        n_target = next(i for i, s in enumerate(n_splits) if s[2] == "noise")
        n_start = n_splits[n_target][0]
        n_seq = _prefix_embeddings(model, neg, n_start, torch.zeros(x.shape[0], device=device))
        uncond_cache = _prefill(model, n_seq, neg, n_splits[:n_target], keep=lambda s: True)
        uncond_pos = neg.rope_pos[:, n_start : n_start + n_query]
    elif use_cfg:
        modality = inp.token_modality
        uncond_cache = _prefill(model, seq, inp, prefix, keep=lambda s: int(modality[s]) != CAPTION_MODALITY)
        lu = uncond_cache.length
        uncond_pos = inp.uncond_rope_pos[:, lu : lu + n_query]

    on_phase("denoise")
    marker_ids = inp.token_ids[[t_start, t_end - 1]]
    markers = model.embed_tokens(marker_ids)
    gen_rows = torch.arange(1, n_query - 1, device=device)
    if query_fn is None:
        def query_fn(q, pos, kv):
            return model.forward_chunk(q, pos, kv, causal=False, gen_rows=gen_rows, update_cache=False)
    cond_pos = inp.rope_pos[:, t_start:t_end]

    timesteps, dts = flow_schedule(sampler.steps, sampler.shift)
    _check_finite(x, "before the first denoising step (the noise or the encoded condition)")
    for i, (t, dt) in enumerate(zip(timesteps.tolist(), dts.tolist())):
        tt = torch.where(update, torch.tensor(t, device=device), torch.zeros((), device=device))
        lat = model.embed_latents(x, tt, inp.vae_grids)[in_query]
        query = torch.cat([markers[:1], lat, markers[1:]])
        h = query_fn(query, cond_pos, cache)
        v = model.velocity(h[1:-1])
        if trace is not None:
            trace.x.append(x.clone())
            trace.v_cond.append(v.clone())
        if use_cfg and sampler.cfg_active(t):
            hu = query_fn(query, uncond_pos, uncond_cache)
            vu = model.velocity(hu[1:-1])
            v = guide(v, vu, sampler.cfg_scale, sampler.renorm_min)
            if trace is not None:
                trace.v_uncond.append(vu.clone())
        if trace is not None:
            trace.v_guided.append(v.clone())
        x[update] = x[update] - v[update_in_query] * dt
        _check_finite(x, f"at denoising step {i + 1} of {sampler.steps} (t = {t:.3f})")
        if progress is not None:
            progress(i)
    return x
