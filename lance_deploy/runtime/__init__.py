"""Running Lance under a GPU byte budget: memory planning (and, beside it, artifact loading).

Planning modules (pure accounting: they read headers and configs only, never tensor data, import
no calibration or algorithm code, and touch no GPU):

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
                    budget with the least streaming.
- ``advice``        when nothing fits: the concrete way out (recipe, tiling, size, budget).
- ``memory_plan``   one request end to end (`ModelInfo` from headers, `make_plan` -> `MemoryPlan`);
                    the `lance-deploy memory-plan` command lives in ``cli/plan_memory.py``.

``artifact_load`` (loading a quantized artifact into the release modules) lives here too.
"""
