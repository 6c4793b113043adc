"""Memory planning and residency for running Lance under a GPU byte budget.

Modules (all pure accounting; nothing here reads tensor data, imports calibration or
algorithm code, or touches a GPU):

- ``weights``       bytes per component and per expert layer, from safetensors / .pth headers
                    at the load dtype (or from any list of per-tensor byte counts, e.g. a
                    quantized artifact's manifest), plus hypothetical recipes (fp8/int8/int4).
- ``workload``      what one request puts through the model: target / context / ViT token
                    counts per task and size, prefill splits, forwards per phase.
- ``memory_model``  byte formulas of the LLM (KV cache, one forward's activations, latent
                    embeddings) and the ViT.
- ``vae_memory``    byte formulas of the Wan2.2 VAE streams (causal caches + one chunk), untiled
                    and tiled.
- ``phases``        the phases of each task and what each needs besides weights.
- ``planner``       the residency plan (resident / streamed expert layers per phase) that fits a
                    budget with the least streaming, or a refusal with a concrete suggestion.
"""
