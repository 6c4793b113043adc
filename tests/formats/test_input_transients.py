"""What `QLinear.forward` holds beyond its input and output, measured on fake CUDA at a denoise row
count, on both sides of the MLP's wide tensor (the down projection's input, the gate / up
projections' output), and what the planner counts for it (`formats.qlinear.input_transient_bytes`,
an upper bound); and the in-place arithmetic that keeps it small gives the same numbers as the
plain formulas and leaves the input alone."""

from __future__ import annotations

import pytest
import torch

from lance_deploy.formats import FormatSpec, PackedTensor, fp8, int8, layout
from lance_deploy.formats.qlinear import QLinear, input_transient_bytes
from lance_deploy.runtime.fake_cuda import FakeCuda

CUDA = torch.device("cuda", 0)
ROWS, WIDE, HIDDEN = 4096, 11008, 2048  # the MLP at thousands of rows
CASES = [("fp8_e4m3", None), ("fp8_e4m3", "dynamic_per_token"), ("int8", None), ("int8", "dynamic_per_token")]


def _held(spec: FormatSpec, smooth: bool, out: int, inn: int) -> float:
    """Bytes per wide element one forward holds beyond its input and output (the weight-only
    paths' one dequantized-weight scratch, which the planner counts per call, taken off)."""
    mode = FakeCuda((9, 0))
    with mode:
        fields = {k: mode.empty(s, d, CUDA) for k, (s, d) in layout((out, inn), spec).items()}
        if smooth:
            fields["smooth"] = mode.empty((inn,), torch.float32, CUDA)
        q = QLinear(PackedTensor(spec=spec, shape=(out, inn), **fields))
        q.prepare(CUDA)
        x = mode.empty((ROWS, inn), torch.bfloat16, CUDA)
        base = mode.memory.current
        mode.memory.set_phase("call")
        y = q(x)
        held = mode.memory.peaks()["call"] - base - y.untyped_storage().nbytes()
    if spec.activations is None:
        held -= out * inn * 2
    return held / (ROWS * WIDE)


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("fmt,activations", CASES)
def test_the_forward_holds_no_more_than_the_planner_counts(fmt, activations, smooth):
    """Measured (bytes per wide element, down side / up side): weight-only 0 / 0, smoothed 4.6 / 0.4,
    W8A8 4.6 / 0.2 (fp8) or 4.5 (int8), smoothed W8A8 6.6 / 0.6 (fp8) or 4.9 (int8)."""
    spec = FormatSpec(fmt, activations=activations)
    w8a8 = fmt if activations is not None else None
    down, up = _held(spec, smooth, HIDDEN, WIDE), _held(spec, smooth, WIDE, HIDDEN)
    assert max(down, up) <= input_transient_bytes(smooth, w8a8)
    if fmt == "fp8_e4m3" and w8a8:  # `_scaled_mm` writes bf16: no fp32 copy of the gate / up output
        assert up <= (0.6 if smooth else 0.2)
    if fmt == "int8" and w8a8:  # the int32 result and one fp32 slice; a whole fp32 copy held 6.2
        assert up <= (4.9 if smooth else 4.6)
    if w8a8 or smooth:  # the in-place arithmetic: the old forward held 8 (10 smoothed W8A8) on the down side
        assert down <= (6.7 if smooth and w8a8 else 4.7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_in_place_quantization_matches_the_plain_formulas(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 300, generator=g) * torch.logspace(-4, 4, 64).unsqueeze(1)).to(dtype)
    before = x.clone()
    for mod, qmax, codes in ((fp8, 448.0, lambda v, s: (v.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)),
                             (int8, 127.0, lambda v, s: torch.round(v.float() / s).clamp(-127, 127).to(torch.int8))):
        scale = (x.float().abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(1e-12)
        got, got_scale = mod.quantize_activations(x)
        assert torch.equal(got_scale, scale)
        assert torch.equal(got.view(torch.uint8), codes(x, scale).view(torch.uint8))
        assert torch.equal(x, before)  # an fp32 input is copied, never divided in place


def test_the_smooth_division_matches_and_leaves_the_input_alone():
    spec = FormatSpec("int8")
    w = torch.randn(8, 128)
    smooth = torch.rand(128) + 0.5
    from lance_deploy.formats import quantize_rtn

    p = quantize_rtn(w, spec)
    q = QLinear(PackedTensor(spec=spec, shape=(8, 128), qdata=p.qdata, scale=p.scale, smooth=smooth),
                prefer_reference=True)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(5, 128).to(dtype)
        before = x.clone()
        plain = QLinear(PackedTensor(spec=spec, shape=(8, 128), qdata=p.qdata, scale=p.scale), prefer_reference=True)
        assert torch.equal(q(x), plain((x.float() / smooth).to(dtype)))
        assert torch.equal(x, before)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_sliced_int8_epilogue_gives_the_whole_tensor_values(dtype, bias):
    from lance_deploy.formats import quantize_rtn

    g = torch.Generator().manual_seed(5)
    spec = FormatSpec("int8", activations="dynamic_per_token")
    p = quantize_rtn(torch.randn(48, 64, generator=g), spec)
    b = torch.randn(48, generator=g) if bias else None
    q = QLinear(p, b)
    x = torch.randn(2, 37, 64, generator=g).to(dtype)  # 74 rows: slices of 10, the last one short
    assert q.kernel(x) == "int8_int_mm"
    xq, xs = int8.quantize_activations(x.reshape(-1, 64))
    y = torch._int_mm(xq, p.qdata.t().contiguous()).float() * xs * p.scale.float().t()
    if bias:
        y = y + b
    assert torch.equal(q(x), y.to(dtype).reshape(2, 37, 48))
