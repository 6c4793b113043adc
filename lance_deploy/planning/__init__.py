"""Memory planning: pure accounting over headers and configs (never tensor data, never a GPU).

- ``weights``       bytes per component and per expert layer at the load dtype, from headers or
                    an artifact's manifest, plus hypothetical fp8/int8/int4 weights.
- ``workload``      what one request puts through the model (token counts from pipeline's own
                    sequence builder), prefill splits, forwards per phase.
- ``memory_model``  byte formulas of the LLM (KV cache, activations) and the ViT.
- ``vae_memory``    byte formulas of the Wan2.2 VAE streams, untiled and tiled.
- ``phases``        the phases of each task and what each needs besides weights.
- ``planner``       the residency plan (resident / streamed expert layers per phase).
- ``advice``        when nothing fits: the concrete way out (weights, tiling, size, budget).
- ``memory_plan``   one request end to end (`ModelInfo` from headers, `make_plan` -> `MemoryPlan`).
- ``request``       the stage functions `plan_memory` and `plan_residency` used by the front ends.
"""
