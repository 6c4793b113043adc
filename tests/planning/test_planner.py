"""The memory planner: byte accounting vs real allocations, header-only full-size numbers, the
residency ledger under a sweep of budgets, refusals, and the `memory-plan` command (CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.core.units import GiB
from lance_deploy.pipeline.tasks import SPECS, TASKS
from lance_deploy.planning.memory_model import LLMShape, kv_bytes_per_token, kv_cache_bytes
from lance_deploy.planning.memory_plan import ModelInfo, PlanRequest, make_plan

REFERENCE = {  # task -> (height, width, frames): the reference configurations
    "t2i": (768, 768, None), "image_edit": (768, 768, None), "t2v": (480, 848, 121),
    "video_edit": (480, 848, 69), "x2t_image": (768, 768, None), "x2t_video": (480, 848, 69),
    "i2v": (480, 848, 61),
}
VIDEO = ("t2v", "i2v", "video_edit", "x2t_video")


# -- a full-size release made of headers only ----------------------------------------------------


@pytest.fixture(scope="module")
def full_release(tmp_path_factory) -> Path:
    """Lance_3B / Lance_3B_Video, the ViT and the VAE at release shapes, in a few KB of disk."""
    from lance_deploy.checkpoint.headers_only import make_header_only_release

    return make_header_only_release(tmp_path_factory.mktemp("full"), golden_root() / "ckpt" / "Lance_3B")


@pytest.fixture(scope="module")
def infos(full_release):
    return {v: ModelInfo.load(full_release, "t2v" if v else "t2i") for v in (False, True)}


def _plan(infos, task, budget, **kw):
    h, w, f = REFERENCE[task]
    return make_plan(infos[task in VIDEO], PlanRequest(task, budget, h, w, f, **kw))


# -- byte accounting against real allocations ------------------------------------------------------


@pytest.mark.parametrize("task", ["t2i", "x2t_image", "video_edit"])
def test_weight_bytes_equal_a_real_load(task):
    from lance_deploy.pipeline.pipeline import LancePipeline

    model = golden_root() / "ckpt" / ("Lance_3B_Video" if task in VIDEO else "Lance_3B")
    pipe = LancePipeline.from_path(model, task, device="cpu", dtype="float32")
    allocated = sum(t.numel() * t.element_size() for m in (pipe.c.lm, pipe.c.vit, pipe.c.vae) if m is not None
                    for t in m.state_dict().values() if not t.is_meta)
    inv = ModelInfo.load(model, task).inventory(task, torch.float32)
    assert inv.total == allocated
    assert ("lm_head" in inv.components) == SPECS[task].lm_head
    assert ("vit" in inv.components) == SPECS[task].vit


def test_kv_formula_equals_a_real_cache():
    """Prefill the golden t2i context (and its caption-free twin) split by split, as `denoise` does."""
    from lance_deploy.model.lance import LanceLM  # noqa: F401  (the API measured here)
    from lance_deploy.pipeline.pipeline import LancePipeline
    from lance_deploy.pipeline.sequence import build_generation_sequence
    from lance_deploy.planning.workload import build_workload

    model = golden_root() / "ckpt" / "Lance_3B"
    pipe = LancePipeline.from_path(model, "t2i", device="cpu", dtype="float32")
    lm, tok = pipe.c.lm, pipe.c.tokenizer
    caption = "a red boat on a calm lake at dawn"
    seq = build_generation_sequence(tok, "t2i", caption, target_grid=(1, 4, 6))
    start = seq.target_range[0]
    caches = []
    with torch.no_grad():
        emb = lm.embed_tokens(seq.token_ids[:start])
        for keep_caption in (True, False):
            cache, at = lm.new_cache(), 0
            for i, (n, mode) in enumerate(zip(seq.split_lens[: seq.target_split], seq.attn_modes)):
                if keep_caption or i != seq.caption_split:
                    lm.forward_chunk(emb[at:at + n], seq.rope_pos[:, at:at + n], cache, causal=mode == "causal")
                at += n
            caches.append(cache)
    shape = LLMShape.of(pipe.c.cfg)
    work = build_workload(tok, "t2i", 64, 96, caption_tokens=seq.split_lens[seq.caption_split])
    assert work.context_tokens == start  # the planner counts the context exactly
    assert caches[0].nbytes() == kv_cache_bytes(shape, work.context_tokens, 4)
    assert caches[1].nbytes() == kv_cache_bytes(shape, work.uncond_context_tokens, 4)


# -- full-size numbers from headers only -------------------------------------------------------------


def test_full_size_weights_from_headers_only(infos, monkeypatch):
    def no_data(*a, **k):
        raise AssertionError("the planner read tensor data")

    monkeypatch.setattr(SafetensorsReader, "read", no_data)
    image, video = infos[False], infos[True]
    inv = image.inventory("t2i", torch.bfloat16)  # stored F32: the load dtype decides
    assert inv.components["und_expert"] == inv.components["gen_expert"] == 5_549_561_856
    assert inv.layer_bytes("gen_expert") == 154_154_496 and inv.num_layers("und_expert") == 36
    assert inv.components["embed_tokens"] == 622_329_856 and "lm_head" not in inv.components
    assert 1.10e9 < inv.components["vae_decoder"] < 1.12e9 and "vae_encoder" not in inv.components
    x2t = video.inventory("x2t_video", torch.bfloat16)
    assert x2t.components["lm_head"] == 622_329_856 and x2t.components["vit"] == 1_337_368_576
    assert x2t.components["gen_expert"] == 0
    assert image.inventory("t2i", torch.float32).components["und_expert"] == 2 * 5_549_561_856
    int8 = image.inventory("t2i", torch.bfloat16, "int8").components["gen_expert"]
    assert 0.49 < int8 / inv.components["gen_expert"] < 0.51  # int8 halves the expert bytes
    assert kv_bytes_per_token(LLMShape.of(image.cfg), 2) == 36_864
    p = make_plan(image, PlanRequest("t2i", 80 * GiB, 768, 768))
    denoise = next(x for x in p.plan.phases if x.name == "denoise")
    assert 11.0e9 < denoise.weights < 11.2e9  # both experts + norms/bridges, embeddings on the host


@pytest.mark.parametrize("task, lo, hi", [("t2i", 10.0, 11.5), ("image_edit", 10.2, 11.8), ("t2v", 13.5, 16.0),
                                          ("video_edit", 15.0, 17.5), ("x2t_image", 5.5, 6.5),
                                          ("x2t_video", 6.5, 8.0), ("i2v", 11.5, 14.0)])
def test_full_size_all_resident_peaks(infos, task, lo, hi):
    """The documented ranges (GiB) of the all-resident bf16 peak at the reference sizes."""
    mp = _plan(infos, task, 80 * GiB)
    assert mp.fits and not any(any(x.streamed.values()) for x in mp.plan.phases)
    assert lo < mp.plan.peak.total / GiB < hi, mp.plan.peak


def test_phases_and_residency(infos):
    mp = _plan(infos, "video_edit", 80 * GiB)
    names = [x.name for x in mp.plan.phases]
    assert names == ["encode_vit", "encode_vae", "prefill", "denoise", "vae_decode"]
    for x in mp.plan.phases:
        assert "embed_tokens" not in x.resident  # lookups only: the table stays on the host
        assert ("vit" in x.resident) == (x.name == "encode_vit")
        assert ("vae_decoder" in x.resident) == (x.name == "vae_decode")
    x2t = [x.name for x in _plan(infos, "x2t_image", 80 * GiB).plan.phases]
    assert x2t == ["encode_vit", "prefill", "text_decode"]
    decode = _plan(infos, "x2t_image", 80 * GiB).plan.phases[-1]
    assert "lm_head" in decode.resident
    assert all("lm_head" not in x.resident for x in mp.plan.phases)
    no_cfg = _plan(infos, "t2v", 80 * GiB, cfg=1.0).plan.phases[1]
    assert no_cfg.kv < next(x for x in _plan(infos, "t2v", 80 * GiB).plan.phases if x.name == "denoise").kv


# -- the ledger under budgets ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_ledger_never_exceeds_the_budget(infos, task):
    fitted = False
    for tenths in range(10, 200, 5):  # 1.0 .. 19.5 GiB
        budget = tenths * GiB // 10
        mp = _plan(infos, task, budget)
        if mp.fits:
            fitted = True
            assert all(x.total <= budget for x in mp.plan.phases)
            assert mp.suggestion is None
            for x in mp.plan.phases:  # streamed + resident layers account for every expert layer
                for e, k in x.streamed.items():
                    kept = x.resident.get(e, 0)
                    compact = x.marker_layers if e == "und_expert" else 0  # the marker copy's layers
                    assert kept == (x.layers[e] - k - compact) * mp.inventory.layer_bytes(e)
        else:
            assert not fitted, f"{task} fits at a smaller budget but not at {tenths / 10} GiB"
            assert mp.suggestion and "--gpu-memory" in mp.suggestion
    assert fitted
    lo = _plan(infos, task, 1 * GiB).plan.min_budget
    assert _plan(infos, task, lo).fits and not _plan(infos, task, lo - (1 << 20)).fits


def test_least_streaming_and_marker_choice(infos):
    roomy = _plan(infos, "t2v", 16 * GiB)
    assert roomy.plan.marker_mode() == "und_expert resident"
    tight = _plan(infos, "t2v", 12 * GiB)
    denoise = next(x for x in tight.plan.phases if x.name == "denoise")
    assert denoise.streamed["und_expert"] > 0 and denoise.streamed["gen_expert"] == 0
    assert tight.plan.marker_mode().startswith("und_expert streamed")
    assert denoise.streamed_bytes == denoise.streamed["und_expert"] * tight.inventory.layer_bytes("und_expert") * 56
    edit = _plan(infos, "image_edit", 8 * GiB)
    prefill = next(x for x in edit.plan.phases if x.name == "prefill")
    assert prefill.streamed.get("und_expert", 0) == 0  # the gen expert runs only the source split: stream it first


def test_marker_policy_weighs_streaming_against_a_compact_copy(infos):
    """512² at 8 GiB: streaming 30+ und layers per forward would not hide behind the small query's
    compute, so `auto` keeps an int8 copy for the marker rows; at 768² the copies hide (est. 1.00x)
    and streaming (exact) stays. `stream` and `int4` force the choice."""
    from lance_deploy.planning.planner import MARKER_TOLERANCE

    def denoise(mp):
        return next(x for x in mp.plan.phases if x.name == "denoise")

    small = make_plan(infos[False], PlanRequest("t2i", 8 * GiB, 512, 512))
    d = denoise(small)
    assert small.fits and d.markers == "int8" and d.marker_layers > 0 and not d.streamed["und_expert"]
    assert d.resident["und_markers_int8"] == sum(small.inventory.compact["int8"][-d.marker_layers:])
    assert "int8 copy" in small.plan.marker_mode()
    exact = denoise(make_plan(infos[False], PlanRequest("t2i", 8 * GiB, 512, 512, markers="stream")))
    assert exact.markers is None and exact.streamed["und_expert"] > 0 and exact.slowdown > MARKER_TOLERANCE
    big = denoise(_plan(infos, "t2i", 8 * GiB))
    assert big.markers is None and big.streamed["und_expert"] > 0 and big.slowdown <= MARKER_TOLERANCE
    forced = _plan(infos, "t2v", 12 * GiB, markers="int4")
    assert forced.fits and denoise(forced).markers == "int4"
    assert denoise(_plan(infos, "t2v", 16 * GiB, markers="int4")).markers is None  # resident: no copy needed
    # an int8 copy of an int8-packed expert would save nothing: int4 is the only smaller copy
    int8 = denoise(make_plan(infos[False], PlanRequest("t2i", 4 * GiB, 512, 512, recipe="int8", markers="int8")))
    assert int8.markers is None and int8.streamed["und_expert"] > 0
    int4 = denoise(make_plan(infos[False], PlanRequest("t2i", 4 * GiB, 512, 512, recipe="int8", markers="int4")))
    assert int4.markers == "int4"


def test_refusal_names_a_concrete_way_out(infos):
    mp = _plan(infos, "t2v", 4 * GiB)
    assert not mp.fits
    assert "denoise needs at least" in mp.suggestion and "--weights int4" in mp.suggestion
    assert "--frames" in mp.suggestion and "--gpu-memory" in mp.suggestion
    untiled = _plan(infos, "t2v", int(5.0 * GiB), tiling=False)
    assert "vae_decode" in untiled.suggestion and "--vae-tiling on" in untiled.suggestion


# -- formulas vs allocations recorded by the profiler --------------------------------------------------


def _peak(fn) -> int:
    """Peak of live CPU allocations inside fn (allocations at op start, frees at op end)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for e in prof.events():
        v = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if v:
            deltas.append((e.time_range.start if v > 0 else e.time_range.end, v))
    cur = peak = 0
    for _, v in sorted(deltas):
        cur += v
        peak = max(peak, cur)
    return peak


def test_forward_activations_match_the_profiler():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lance_deploy.config import LLMConfig
    from lance_deploy.model.lance import LanceLM
    from lance_deploy.planning.memory_model import forward_bytes

    cfg = LLMConfig(hidden_size=512, intermediate_size=2752, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    lm, s = LanceLM(cfg).to(torch.bfloat16).eval(), LLMShape.of(cfg)
    C, n = 300, 1026
    with torch.no_grad():
        cache = lm.new_cache()
        lm.forward_chunk(torch.randn(C, 512, dtype=torch.bfloat16), torch.arange(C).expand(3, C), cache, causal=False)
        x, pos, gen = torch.randn(n, 512, dtype=torch.bfloat16), torch.arange(C, C + n).expand(3, n), torch.arange(1, n - 1)
        for backend, math in ((SDPBackend.FLASH_ATTENTION, False), (SDPBackend.MATH, True)):
            with sdpa_kernel(backend):
                got = _peak(lambda: lm.forward_chunk(x, pos, cache, causal=False, gen_rows=gen, update_cache=False))
            assert abs(forward_bytes(s, n, 2, gen_rows=n - 2, cached=C, math=math) / got - 1) < 0.10
        with sdpa_kernel(SDPBackend.MATH):  # a masked causal split (math on CUDA: flash takes no mask)
            got = _peak(lambda: lm.forward_chunk(x[:200], pos[:, :200], cache, causal=True, update_cache=False))
        assert abs(forward_bytes(s, 200, 2, cached=C, math=True, masked=True) / got - 1) < 0.10


def test_vae_walk_matches_the_profiler_with_gpu_like_convs(monkeypatch):
    """CPU convs allocate im2col buffers that cuDNN does not: replace them by their output alone."""
    import torch.nn.functional as F

    from lance_deploy.model.vae import WanVAE
    from lance_deploy.model.vae_tiling import TilingConfig
    from lance_deploy.planning.vae_memory import vae_decode_bytes, vae_encode_bytes

    def output_only(nd):
        def conv(x, w, b=None, stride=1, padding=0, *a, **k):
            st = (stride,) * nd if isinstance(stride, int) else stride
            pad = (padding,) * nd if isinstance(padding, int) else padding
            size = [(x.shape[2 + i] + 2 * pad[i] - w.shape[2 + i]) // st[i] + 1 for i in range(nd)]
            return torch.zeros([x.shape[0], w.shape[0], *size], dtype=x.dtype)
        return conv

    monkeypatch.setattr(F, "conv3d", output_only(3))
    monkeypatch.setattr(F, "conv2d", output_only(2))
    vae = WanVAE(8, 16).to(torch.bfloat16).eval()
    with torch.no_grad():
        for grid, tile in (((1, 8, 8), None), ((3, 10, 10), 6)):
            z = torch.randn(*grid, 48)
            tc = TilingConfig(tile=tile, overlap=2, enabled=True) if tile else TilingConfig(enabled=False)
            got = _peak(lambda z=z, tc=tc: vae.decode(z, tiling=tc)) + z.numel() * 6  # + the denormalised latent
            assert abs(vae_decode_bytes(16, grid, 2, tile, 2).total / got - 1) < 0.10, (grid, tile)
        for f, h, w, tile in ((9, 64, 96, None), (5, 96, 96, 4)):
            x = torch.randn(3, f, h, w, dtype=torch.bfloat16)
            tc = TilingConfig(tile=tile, overlap=1, enabled=True) if tile else TilingConfig(enabled=False)
            got = _peak(lambda x=x, tc=tc: vae.encode(x, tiling=tc)) + x.numel() * 2  # + the input, on the device
            assert abs(vae_encode_bytes(8, f, h, w, 2, tile).total / got - 1) < 0.10, (f, h, w, tile)


def test_vit_and_latent_embedding_match_the_profiler():
    from lance_deploy.config import LLMConfig, VisionConfig
    from lance_deploy.model.lance import LanceLM
    from lance_deploy.model.vit import QwenViT, patchify_video_with_merge
    from lance_deploy.planning.memory_model import ViTShape, latent_embedding_bytes, vit_bytes

    vc = VisionConfig(depth=2, hidden_size=320, num_heads=4, intermediate_size=856, out_hidden_size=512,
                      fullatt_block_indexes=(1,))
    vit = QwenViT(vc).to(torch.bfloat16).eval()
    patches, grid = patchify_video_with_merge(torch.randn(3, 4, 112, 224))
    patches = patches.to(torch.bfloat16)
    with torch.no_grad():
        got = _peak(lambda: vit(patches, grid)) + patches.numel() * 2
    assert abs(vit_bytes(ViTShape.of(vc), patches.shape[0], 2) / got - 1) < 0.10
    cfg = LLMConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64)
    lm = LanceLM(cfg).to(torch.bfloat16).eval()
    grids = [(2, 12, 16), (2, 12, 16)]
    rows = sum(a * b * c for a, b, c in grids)
    with torch.no_grad():
        got = _peak(lambda: lm.embed_latents(torch.randn(rows, 48), torch.rand(rows), grids))
    assert abs(latent_embedding_bytes(LLMShape.of(cfg), rows, rows // 2, 2) / got - 1) < 0.10


# -- the command ----------------------------------------------------------------------------------------


def test_parse_size():
    from lance_deploy.core.errors import LanceUsageError
    from lance_deploy.core.units import parse_size

    assert parse_size("16GiB") == 16 << 30 and parse_size("12GB") == 12 * 10**9
    assert parse_size("8000MiB") == 8000 << 20 and parse_size("1234") == 1234 and parse_size(" 7.5 gib") == int(7.5 * GiB)
    for bad in ("12XB", "GiB", "-1GiB", "0"):
        with pytest.raises(LanceUsageError, match="--gpu-memory"):
            parse_size(bad)


def test_memory_plan_command(full_release):
    from lance_deploy.cli.plan_memory import memory_plan_cmd
    from lance_deploy.planning.request import plan_memory

    runner = CliRunner()
    base = ["--model", str(full_release)]
    res = runner.invoke(memory_plan_cmd, base + ["--task", "t2v", "--height", "480", "--width", "848", "--frames",
                                                 "121", "--gpu-memory", "16GiB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["fits"] and [p["name"] for p in out["phases"]] == ["prefill", "denoise", "vae_decode"]
    assert out["workload"]["target_tokens"] == 49_290 and out["marker_tokens"] == "und_expert resident"
    res = runner.invoke(memory_plan_cmd, base + ["--task", "t2i", "--gpu-memory", "8GiB"])
    assert res.exit_code == 0 and "denoise" in res.output and "residency" in res.output
    res = runner.invoke(memory_plan_cmd, base + ["--task", "t2v", "--gpu-memory", "3GiB"])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("Error: does not fit in 3.0 GiB")
    res = runner.invoke(memory_plan_cmd, base + ["--task", "t2i", "--gpu-memory", "lots"])
    assert res.exit_code == 2 and "--gpu-memory 'lots'" in res.stderr
    if not torch.cuda.is_available():
        res = runner.invoke(memory_plan_cmd, base + ["--task", "t2i"])
        assert res.exit_code == 2 and "--gpu-memory is required" in res.stderr
    mp = plan_memory(full_release, "x2t_image", gpu_memory="8GiB", dtype="bfloat16")
    assert mp.fits and mp.to_dict()["phases"][-1]["name"] == "text_decode"
    small = base + ["--task", "t2i", "--height", "512", "--width", "512", "--gpu-memory", "8GiB", "--json"]
    for policy, copy in (("auto", "int8"), ("stream", None), ("int4", "int4")):
        res = runner.invoke(memory_plan_cmd, small + ["--markers", policy])
        assert res.exit_code == 0, res.output
        denoise = json.loads(res.stdout)["phases"][1]
        assert denoise["name"] == "denoise" and denoise["marker_copy"] == copy
        assert (denoise["streamed_layers"]["und_expert"] > 0) == (copy is None)
    res = runner.invoke(memory_plan_cmd, small + ["--markers", "fp4"])
    assert res.exit_code == 2 and "--markers" in res.output


def test_manifest_entries_feed_the_same_inventory():
    """A quantized artifact's manifest (duck-typed records) gives per-component bytes directly."""
    from types import SimpleNamespace as NS

    from lance_deploy.planning.weights import inventory, manifest_entries

    def rec(name, release, shape, fields, spec=None):
        return NS(name=name, release_name=release, shape=shape, spec=spec,
                  fields={k: NS(dtype=d, nbytes=n) for k, (d, n) in fields.items()},
                  nbytes=sum(n for _, n in fields.values()))

    layer = "language_model.model.layers.0."
    m = NS(tensors=[
        rec("blk.0.gen.ffn_up", layer + "mlp_moe_gen.up_proj.weight", (256, 128),
            {"qdata": ("I8", 256 * 128), "scale": ("F32", 256 * 4)}, spec={"name": "int8"}),
        rec("blk.0.und.attn_norm", layer + "input_layernorm.weight", (128,), {"tensor": ("BF16", 256)}),
        rec("embed_tokens", "language_model.model.embed_tokens.weight", (10, 128), {"tensor": ("BF16", 2560)}),
        rec("vit.blocks.0.norm1.weight", "vit_model.blocks.0.norm1.weight", (32,), {"tensor": ("BF16", 64)}),
        rec("vae.decoder.conv1.bias", "decoder.conv1.bias", (8,), {"tensor": ("F32", 32)}),
    ])
    inv = inventory(manifest_entries(m, torch.bfloat16), SPECS["t2i"], "int8")
    assert inv.components["gen_expert"] == 256 * 128 + 256 * 4 and inv.layers["gen_expert"] == (33792,)
    assert inv.components["und_expert"] == 256 and inv.components["embed_tokens"] == 2560
    assert inv.components["vae_decoder"] == 16 and "vit" not in inv.components  # cast to bf16; t2i has no ViT
