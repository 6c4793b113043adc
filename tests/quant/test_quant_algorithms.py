"""Algorithms on synthetic layers, with and without planted outliers, measured on held-out rows.

The layer: W [256, 512] ~ N(0, 1/in); inputs with a power-law covariance (eigenvalues ∝ k^-1,
so inputs are correlated as real activations are; GPTQ has nothing to exploit on white noise).
The outlier variant scales 8 input channels by 30 and divides the matching weight columns by 30,
so X Wᵀ is unchanged: the planting issue #3 prescribes for test checkpoints.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file, save_file

from lance_deploy import formats as F
from lance_deploy.formats import FormatSpec
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.quant.algorithms import (
    LayerStats,
    awq,
    awq_group,
    fold_into_norm,
    gptq,
    rtn,
    smoothquant,
    smoothquant_group,
)
from lance_deploy.quant.metrics import rel_l2

INT4 = FormatSpec("int4", group_size=64)
W8A8 = FormatSpec("int8", activations="dynamic_per_token")


def make_layer(outliers: bool, seed: int = 0, out: int = 256, inn: int = 512, n: int = 1024):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) / inn**0.5
    q, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g))
    spectrum = torch.arange(1, inn + 1).float().pow(-0.5)
    mix = (q * spectrum) @ q.t() * inn**0.5 / spectrum.norm()  # unit mean variance
    x = torch.randn(2 * n, inn, generator=g) @ mix
    if outliers:
        ch = torch.randperm(inn, generator=g)[:8]
        x[:, ch] *= 30
        w[:, ch] /= 30
    stats = LayerStats(inn).update(x[:n])
    return w, stats, x[n:]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "outliers"])
def layer(request):
    return request.param, *make_layer(request.param)


def out_err(packed, w, x) -> float:
    """Relative output error of the layer as the runtime computes it (held-out rows)."""
    return rel_l2(x @ w.t(), QLinear(packed, prefer_reference=True)(x))


def test_awq_int4_beats_rtn(layer):
    outliers, w, stats, x = layer
    e_awq, e_rtn = out_err(awq(w, stats, INT4).runtime(), w, x), out_err(rtn(w, None, INT4), w, x)
    assert e_awq <= (0.7 if outliers else 1.0) * e_rtn, (e_awq, e_rtn)


def test_awq_int4_beats_nf4_on_outliers():
    w, stats, x = make_layer(True)
    e_awq = out_err(awq(w, stats, INT4).runtime(), w, x)
    # Our nf4 packing is bit-identical to bitsandbytes' (test_quant_formats); where bnb is
    # installed, also check against its own quantizer and matmul.
    assert e_awq <= out_err(rtn(w, None, FormatSpec("nf4")), w, x)
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb

        q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert e_awq <= rel_l2(x @ w.t(), bnb.matmul_4bit(x, q.t(), quant_state=state))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_int4_beats_rtn(layer, act_order):
    _, w, stats, x = layer
    p = F.validate(gptq(w, stats, INT4, act_order=act_order))
    assert out_err(p, w, x) <= out_err(rtn(w, None, INT4), w, x)


@pytest.mark.parametrize("spec", [FormatSpec("int8"), FormatSpec("fp8_e4m3"), FormatSpec("nf4")], ids=lambda s: s.label)
def test_gptq_other_formats_beat_rtn(spec):
    w, stats, x = make_layer(False, n=768)
    assert out_err(F.validate(gptq(w, stats, spec)), w, x) <= out_err(rtn(w, None, spec), w, x)


def test_smoothquant_w8a8(layer):
    outliers, w, stats, x = layer
    e_sq, e_rtn = out_err(smoothquant(w, stats, W8A8).runtime(), w, x), out_err(rtn(w, None, W8A8), w, x)
    assert e_sq <= (0.25 if outliers else 1.0) * e_rtn, (e_sq, e_rtn)
    searched = smoothquant(w, stats, W8A8, alpha=None)
    assert 0 < searched.alpha < 1 and out_err(searched.runtime(), w, x) <= 1.02 * e_sq


def test_gptq_on_top_of_smoothquant():
    w, stats, x = make_layer(True)
    sq = smoothquant(w, stats, W8A8)
    both = gptq(w, stats, W8A8, input_scale=sq.input_scale).with_smooth(sq.input_scale)
    assert out_err(both, w, x) <= out_err(sq.runtime(), w, x)


def test_scale_folds_into_the_norm():
    # RMSNorm(h)·γ feeds q/k/v; folding 1/s into γ equals the runtime divisor, for all three.
    w, stats, x = make_layer(True)
    qkv = [w[:128], w[128:192], w[192:]]
    results = awq_group(qkv, stats, INT4)
    s = results[0].input_scale
    assert all(torch.equal(r.input_scale, s) for r in results)
    h = torch.randn(16, 512)
    gamma = torch.rand(512) + 0.5
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    for r in results:
        folded = QLinear(r.packed, prefer_reference=True)(normed * fold_into_norm(gamma, s))
        divided = QLinear(r.runtime(), prefer_reference=True)(normed * gamma)
        assert rel_l2(divided, folded) < 1e-5
    sq = smoothquant_group(qkv, stats, W8A8)
    assert all(torch.equal(r.input_scale, sq[0].input_scale) for r in sq)


def test_gptq_handles_dead_inputs_and_bf16():
    w, _, x = make_layer(False, n=256)
    x[:, :5] = 0
    stats = LayerStats(512).update(x)
    p = gptq(w, stats, INT4)
    assert torch.isfinite(F.dequantize(p)).all()
    assert torch.equal(gptq(w, stats, FormatSpec("bf16")).qdata, w.bfloat16())


def test_algorithms_need_their_statistics():
    w = torch.randn(64, 128)
    with pytest.raises(ValueError, match="needs a Hessian"):
        gptq(w, LayerStats(128, hessian_dtype=None).update(torch.randn(4, 128)), INT4)
    with pytest.raises(ValueError, match="AWQ needs calibration rows"):
        awq(w, LayerStats(128), INT4)
    with pytest.raises(F.FormatError, match="group_size 64 does not divide in_features 96"):
        awq(torch.randn(8, 96), LayerStats(96).update(torch.randn(4, 96)), INT4)


def test_layer_stats_streaming_equals_one_batch():
    x = torch.randn(300, 32, dtype=torch.float64).float()
    whole = LayerStats(32, cap=1000, hessian_dtype=torch.float64).update(x)
    parts = LayerStats(32, cap=1000, hessian_dtype=torch.float64)
    for chunk in x.split(70):
        parts.update(chunk.reshape(2, -1, 32) if len(chunk) % 2 == 0 else chunk)
    assert parts.count == whole.count == 300
    assert torch.equal(parts.absmax, whole.absmax)
    assert torch.allclose(parts.abs_sum, whole.abs_sum) and torch.allclose(parts.hessian, whole.hessian)
    assert torch.allclose(whole.hessian, (x.double().t() @ x.double()))
    assert torch.allclose(whole.mean_abs, x.abs().mean(0))


def test_layer_stats_reservoir_is_capped_deterministic_and_mergeable():
    x = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 8)  # row i is all i
    a = LayerStats(8, cap=64, seed=1).update(x[:600])
    b = LayerStats(8, cap=64, seed=2).update(x[600:])
    assert a.rows.shape == (64, 8) and torch.equal(a.rows, LayerStats(8, cap=64, seed=1).update(x[:600]).rows)
    a.merge(b)
    assert a.count == 1000 and a.rows.shape == (64, 8)
    picked = a.rows[:, 0]
    assert len(set(picked.tolist())) == 64  # without replacement
    assert 10 < int((picked >= 600).sum()) < 45  # ~40 % from b's 400 rows, not all from one side


def test_layer_stats_safetensors_round_trip(tmp_path):
    s = LayerStats(16, cap=8).update(torch.randn(20, 16))
    save_file(s.to_tensors("blk.0.gen.attn_q"), str(tmp_path / "s.safetensors"))
    back = LayerStats.from_tensors("blk.0.gen.attn_q", load_file(str(tmp_path / "s.safetensors")), cap=8)
    assert back.count == 20
    for f in ("absmax", "abs_sum", "rows", "keys", "hessian"):
        assert torch.equal(getattr(back, f), getattr(s, f))
    back.update(torch.randn(5, 16))  # keeps streaming after a reload
    assert back.count == 25 and back.rows.shape == (8, 16)
