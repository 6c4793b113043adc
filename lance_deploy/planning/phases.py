"""The phases of each task and what each needs on the GPU besides expert weights.

    t2i, t2v        prefill -> denoise -> vae_decode
    i2v             encode_vae -> prefill -> denoise -> vae_decode
    edits           encode_vit -> encode_vae -> prefill -> denoise -> vae_decode
    x2t             encode_vit -> prefill -> text_decode

(`encode` is split in two: the ViT and the VAE encoder never need to be resident together.)
A `PhaseDemand` lists the experts a phase runs, with how many forwards touch each (what one
streamed layer costs in copies), the components that must be resident whole, and the non-weight
bytes at the phase's busiest moment: KV caches, activations (LLM / ViT), VAE activations, and
tensors carried across phases (ViT tokens, the prefix embeddings `denoise` keeps, latents).
Embeddings stay on the host: only looked-up rows move, and they are counted in `carried`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lance_deploy.planning.memory_model import (
    LLMShape,
    ViTShape,
    forward_bytes,
    forward_flops,
    kv_cache_bytes,
    latent_embedding_bytes,
    logits_bytes,
    vit_bytes,
)
from lance_deploy.planning.vae_memory import vae_decode_bytes, vae_encode_bytes
from lance_deploy.planning.workload import Workload

LATENT_CHANNELS = 48


@dataclass(frozen=True)
class PhaseDemand:
    """One phase's needs; byte fields are at the phase's peak moment."""

    name: str
    experts: dict[str, int] = field(default_factory=dict)  # expert -> forwards that use it
    fixed: tuple[str, ...] = ()  # components resident whole in this phase
    kv: int = 0
    activations: int = 0
    vae: int = 0
    carried: int = 0
    forwards: int = 0
    flops: int = 0  # one forward of the phase's busiest kind (denoise: the query), for time estimates

    @property
    def non_weight(self) -> int:
        return self.kv + self.activations + self.vae + self.carried


@dataclass(frozen=True)
class ModelDims:
    """Shapes the formulas need, from the configs and headers."""

    llm: LLMShape
    vit: ViTShape | None
    vae_enc_dim: int
    vae_dec_dim: int


@dataclass(frozen=True)
class RunOptions:
    b: int = 2  # compute dtype bytes
    linear_input: tuple[int, int] = (0, 0)  # (und, gen): what a quantized Linear holds per input element
    flash: bool = True  # SDPA flash kernel usable (CUDA sm80+, bf16/fp16)
    tiling: bool | None = None  # VAE tiling: None = auto (latent side > threshold), as the pipeline
    tile: int = 32
    overlap: int = 8
    threshold: int = 36


def _tiled(opts: RunOptions, h: int, w: int) -> int | None:
    on = max(h, w) > opts.threshold if opts.tiling is None else opts.tiling
    return opts.tile if on else None


def _prefill(work: Workload, dims: ModelDims, opts: RunOptions, carried: int) -> PhaseDemand:
    """Both prefills, split by split: the peak is the worst (caches so far + one chunk)."""
    s, b = dims.llm, opts.b
    passes = [list(work.prefix)] + ([[x for x in work.prefix if not x.caption]] if work.cfg else [])
    best = (0, 0, 0)  # (total, kv, act)
    done_kv = 0
    for splits in passes:
        cached = 0
        for sp in splits:
            masked = sp.mode == "causal" and sp.n > 1
            act = forward_bytes(s, sp.n, b, gen_rows=sp.gen_rows, cached=cached, math=masked or not opts.flash,
                                masked=masked, linear_input=opts.linear_input)
            kv = done_kv + kv_cache_bytes(s, cached + sp.n, b)
            best = max(best, (kv + act, kv, act))
            cached += sp.n
        done_kv += kv_cache_bytes(s, cached, b)
    if work.vae_rows and any(x.gen_rows for x in work.prefix):  # edits embed every latent row up front
        act = latent_embedding_bytes(s, work.vae_rows, work.vae_rows // 2, b)
        best = max(best, (act, 0, act))
    experts = {"und_expert": sum(len(p) for p in passes)}
    gen = sum(1 for p in passes for x in p if x.gen_rows)
    if gen:
        experts["gen_expert"] = gen
    return PhaseDemand("prefill", experts, ("norms_bridges",), best[1], best[2], 0, carried,
                       sum(len(p) for p in passes))


def _denoise(work: Workload, dims: ModelDims, opts: RunOptions, carried: int) -> PhaseDemand:
    s, b, n, N = dims.llm, opts.b, work.query_tokens, work.target_tokens
    kv = kv_cache_bytes(s, work.context_tokens, b)
    if work.cfg:
        kv += kv_cache_bytes(s, work.uncond_context_tokens, b)
    forward = forward_bytes(s, n, b, gen_rows=N, cached=work.context_tokens, math=not opts.flash,
                            linear_input=opts.linear_input)
    # latent rows + query; v, v_uncond; with CFG the cond branch's output lives through the uncond forward
    step = forward + (3 if work.cfg else 2) * n * s.hidden * b + 2 * N * LATENT_CHANNELS * 4
    embed = latent_embedding_bytes(s, work.vae_rows, N, b)
    uses = {"und_expert": work.forwards, "gen_expert": work.forwards}
    return PhaseDemand("denoise", uses, ("norms_bridges",), kv, max(step, embed), 0, carried, work.forwards,
                       forward_flops(s, n, work.context_tokens))


def phase_demands(work: Workload, dims: ModelDims, opts: RunOptions) -> list[PhaseDemand]:
    """The phases of `work.task` in order."""
    s, b, spec, out = dims.llm, opts.b, work.spec, []
    vit_out = work.vit_tokens * s.hidden * b
    if spec.vit:
        out.append(PhaseDemand("encode_vit", fixed=("vit",), activations=vit_bytes(dims.vit, work.vit_patches, b),
                               forwards=1))
    if spec.vae_encoder:
        f, H, W = work.encode_pixels
        enc = vae_encode_bytes(dims.vae_enc_dim, f, H, W, b, _tiled(opts, H // 16, W // 16))
        out.append(PhaseDemand("encode_vae", fixed=("vae_encoder",), vae=enc.total, carried=vit_out, forwards=1))
    # carried through prefill and denoise: ViT tokens, the prefix embeddings, the latents (fp32)
    carried = vit_out + work.context_tokens * s.hidden * b + work.vae_rows * LATENT_CHANNELS * 4
    out.append(_prefill(work, dims, opts, carried))
    if spec.gen:
        out.append(_denoise(work, dims, opts, carried))
        dec = vae_decode_bytes(dims.vae_dec_dim, work.target_grid, b,
                               _tiled(opts, *work.target_grid[1:]), opts.overlap)
        out.append(PhaseDemand("vae_decode", fixed=("vae_decoder",), vae=dec.total,
                               carried=vit_out + work.vae_rows * LATENT_CHANNELS * 4, forwards=1))
    else:
        total = work.context_tokens + work.max_new_tokens
        act = (forward_bytes(s, 1, b, cached=total, math=not opts.flash, linear_input=opts.linear_input)
               + logits_bytes(s, work.max_new_tokens))
        out.append(PhaseDemand("text_decode", {"und_expert": work.max_new_tokens}, ("norms_bridges", "lm_head"),
                               kv_cache_bytes(s, total, b), act, 0, carried, work.max_new_tokens))
    return out
