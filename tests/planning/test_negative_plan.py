"""A negative prompt adds its caption to the uncond branch's KV cache; the planner counts it."""

from __future__ import annotations

from golden_data import golden_root

from lance_deploy.planning.request import plan_memory


def _denoise_kv(**kw) -> tuple[int, int]:
    mp = plan_memory(golden_root() / "ckpt", "t2i", 64, 64, gpu_memory="4GiB", dtype="float32", **kw)
    return next(p.kv for p in mp.plan.phases if p.name == "denoise"), mp.workload.uncond_context_tokens


def test_a_negative_prompt_grows_the_uncond_cache():
    kv0, tokens0 = _denoise_kv()
    kv1, tokens1 = _denoise_kv(negative_tokens=100)
    assert tokens1 == tokens0 + 100
    assert kv1 > kv0
