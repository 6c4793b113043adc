"""Format contract suite: SQNR gates, byte counts, packing, serialisation, and QLinear paths
against the reference dequantizers (bit-exact on CPU; CUDA kernels under the gpu marker)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as Fn
from safetensors.torch import load_file, save_file

from lance_deploy import formats as F
from lance_deploy.formats import FormatError, FormatSpec, PackedTensor, int4
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.quant.metrics import cosine, psnr_db, rel_l2, sqnr_db

W8A8 = "dynamic_per_token"
# spec, SQNR floor (dB) on N(0, 1/in) weights [256, 512]; measured values are in the report.
SPECS = {
    "bf16": (FormatSpec("bf16"), 50.0),
    "fp8": (FormatSpec("fp8_e4m3"), 28.0),
    "fp8_w8a8": (FormatSpec("fp8_e4m3", activations=W8A8), 28.0),
    "int8": (FormatSpec("int8"), 38.0),
    "int8_w8a8": (FormatSpec("int8", activations=W8A8), 38.0),
    "int4_g64": (FormatSpec("int4", group_size=64), 17.0),
    "int4_g128": (FormatSpec("int4", group_size=128), 17.0),
    "int4_g64_sym": (FormatSpec("int4", group_size=64, symmetric=True), 17.0),
    "nf4": (FormatSpec("nf4"), 18.0),
}
# Bytes of a [256, 512] weight, written out from each format's docstring.
EXPECTED_BYTES = {
    "bf16": 256 * 512 * 2,
    "fp8": 256 * 512 + 256 * 4,
    "fp8_w8a8": 256 * 512 + 256 * 4,
    "int8": 256 * 512 + 256 * 4,
    "int8_w8a8": 256 * 512 + 256 * 4,
    "int4_g64": 256 * 256 + 256 * 8 * 4 + 256 * 8,
    "int4_g128": 256 * 256 + 256 * 4 * 4 + 256 * 4,
    "int4_g64_sym": 256 * 256 + 256 * 8 * 4,
    "nf4": 256 * 256 + 256 * 8 * 4,
}
IDS = list(SPECS)


def _has_bnb() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) / 512**0.5


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("key", IDS)
def test_sqnr_bytes_and_layout(key, weight):
    spec, floor = SPECS[key]
    p = F.validate(F.quantize_rtn(weight, spec))
    assert sqnr_db(weight, F.dequantize(p)) >= floor
    assert p.nbytes == F.nbytes(p.shape, spec) == EXPECTED_BYTES[key]
    assert torch.equal(F.fake_quant_rtn(weight, spec), F.dequantize(p))


@pytest.mark.parametrize("key", IDS)
def test_repacking_a_dequantized_weight_gives_the_same_codes(key, weight):
    # GPTQ relies on this: pack(dequantize(p), p's params) reproduces p exactly.
    p = F.quantize_rtn(weight, SPECS[key][0])
    again = F.pack(F.dequantize(p), p.scale, p.zero_point, p.spec)
    assert all(_equal(a, b) for a, b in zip(p.tensors().values(), again.tensors().values()))


def test_nibble_packing_round_trip_and_order():
    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(int4.unpack_nibbles(int4.pack_nibbles(codes)), codes)
    assert int4.pack_nibbles(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21  # low = even


def test_nf4_high_nibble_is_even_column():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = 1.0, -1.0
    assert F.quantize_rtn(w, FormatSpec("nf4")).qdata[0, 0].item() == 0xF0


@pytest.mark.skipif(not _has_bnb(), reason="bitsandbytes not installed")
def test_nf4_is_bit_identical_to_bitsandbytes(weight):
    import bitsandbytes.functional as bnbf

    p = F.quantize_rtn(weight, FormatSpec("nf4"))
    q, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(p.qdata.reshape(-1), q.reshape(-1))
    assert torch.equal(p.scale.reshape(-1), state.absmax)
    assert torch.equal(F.dequantize(p), bnbf.dequantize_4bit(q, state).float())


def test_spec_dict_round_trip_and_defaults():
    for spec, _ in SPECS.values():
        d = spec.to_dict()
        assert d["version"] == 1 and FormatSpec.from_dict(d) == spec
    assert FormatSpec("int4", group_size=128).symmetric is False
    assert FormatSpec("nf4").group_size == 64
    assert FormatSpec("int4", group_size=128).label == "int4-g128-asym"
    assert FormatSpec("int8", activations=W8A8).label == "int8-w8a8"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "int3"}, "unknown format 'int3'"),
        ({"name": "int4", "group_size": 96}, "int4 group_size 96 not allowed"),
        ({"name": "int8", "group_size": 64}, "group_size must be None"),
        ({"name": "int8", "symmetric": False}, "symmetric=True only"),
        ({"name": "int4", "group_size": 64, "activations": W8A8}, "needs fp8_e4m3 or int8"),
        ({"name": "fp8_e4m3", "activations": "static"}, "activations 'static' not allowed"),
    ],
)
def test_bad_specs_are_named(kwargs, message):
    with pytest.raises(FormatError, match=message):
        FormatSpec(**kwargs)


def test_spec_from_dict_refuses_drift():
    with pytest.raises(FormatError, match="unknown format spec keys"):
        FormatSpec.from_dict({"version": 1, "name": "int8", "bits": 8})
    with pytest.raises(FormatError, match="version 2 not supported"):
        FormatSpec.from_dict({"version": 2, "name": "int8"})


def test_shape_errors_name_the_layer():
    with pytest.raises(FormatError, match="blk.3.gen.ffn_down: group_size 128 does not divide in_features 192"):
        F.quantize_rtn(torch.randn(8, 192), FormatSpec("int4", group_size=128), name="blk.3.gen.ffn_down")
    with pytest.raises(FormatError, match="expected a 2-D"):
        F.quantize_rtn(torch.randn(8), FormatSpec("int8"))


def test_validate_names_the_bad_field(weight):
    p = F.quantize_rtn(weight, FormatSpec("int4", group_size=64))
    p.zero_point = p.zero_point.float()
    with pytest.raises(FormatError, match=r"weight.zero_point: got torch.float32"):
        F.validate(p)
    p.zero_point = None
    with pytest.raises(FormatError, match="missing field 'zero_point'"):
        F.validate(p)


@pytest.mark.parametrize("key", IDS)
def test_safetensors_round_trip(key, weight, tmp_path):
    spec = SPECS[key][0]
    p = F.quantize_rtn(weight, spec).with_smooth(torch.rand(512) + 0.5)
    path = tmp_path / "w.safetensors"
    save_file(p.to_tensors("blk.0.und.attn_q"), str(path))
    back = F.validate(PackedTensor.from_tensors("blk.0.und.attn_q", load_file(str(path)), spec, (256, 512)))
    assert back.tensors().keys() == p.tensors().keys()
    assert all(_equal(p.tensors()[k], t) for k, t in back.tensors().items())


def test_to_moves_every_field(weight):
    p = F.quantize_rtn(weight, FormatSpec("int4", group_size=64)).with_smooth(torch.ones(512))
    m = p.to("meta")
    assert {t.device.type for t in m.tensors().values()} == {"meta"} and m.spec == p.spec and m.shape == p.shape
    assert p.to("cpu").nbytes == p.nbytes == F.nbytes(p.shape, p.spec) + 512 * 4
    if torch.cuda.is_available():
        assert all(t.is_pinned() for t in p.pin_memory().tensors().values())


# --- QLinear: every CPU path against the reference math --------------------------------------


def _module(key, weight, smooth=None):
    spec = SPECS[key][0]
    bias = torch.randn(256, generator=torch.Generator().manual_seed(2))
    p = F.quantize_rtn(weight, spec).with_smooth(smooth)
    return QLinear(p, bias, prefer_reference=True), p, bias


@pytest.mark.parametrize("key", ["bf16", "fp8", "int8", "int4_g64", "int4_g128", "int4_g64_sym", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_path_equals_reference_dequant_matmul(key, dtype, weight):
    m, p, bias = _module(key, weight)
    x = torch.randn(2, 5, 512).to(dtype)
    ref = Fn.linear(x, F.dequantize(p).to(dtype), bias.to(dtype))
    assert m.kernel(x) in ("linear", "dequant_matmul")
    y = m(x)
    assert y.dtype == dtype and torch.equal(y, ref)


def test_int8_w8a8_path_is_the_explicit_integer_math(weight):
    m, p, bias = _module("int8_w8a8", weight)
    x = torch.randn(7, 512) * torch.linspace(0.1, 3, 512)
    xs = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    xq = torch.round(x / xs).clamp(-127, 127)
    acc = (xq.long() @ p.qdata.long().t()).float()  # exact int64 accumulate
    explicit = acc * xs * p.scale.t() + bias
    assert m.kernel(x) == "int8_int_mm" and torch.equal(m(x), explicit)
    fake = (xq.double() * xs.double()) @ F.dequantize(p).double().t() + bias.double()
    assert rel_l2(fake, m(x)) < 1e-6


def test_fp8_w8a8_path_is_the_explicit_fp8_math(weight):
    m, p, bias = _module("fp8_w8a8", weight)
    x = torch.randn(7, 512)
    xs = (x.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-12)
    xq = (x / xs).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    explicit = (xq @ p.qdata.float().t()) * xs * p.scale.t() + bias
    assert m.kernel(x) == "fp8_w8a8_reference" and torch.equal(m(x), explicit)


@pytest.mark.parametrize("key", ["int8_w8a8", "int4_g64"])
def test_smooth_divides_the_input(key, weight):
    smooth = torch.rand(512) + 0.5
    m, p, _ = _module(key, weight, smooth)
    plain = QLinear(p.with_smooth(None), m.bias, prefer_reference=True)
    x = torch.randn(4, 512)
    assert torch.equal(m(x), plain(x / smooth))
    assert torch.equal(F.effective_weight(p), F.dequantize(p) / smooth)


@pytest.mark.skipif(not _has_bnb(), reason="bitsandbytes not installed")
def test_nf4_bitsandbytes_path_matches_reference(weight):
    m, p, bias = _module("nf4", weight)
    fast = QLinear(p, bias)
    for x in (torch.randn(1, 512), torch.randn(3, 4, 512)):
        assert fast.kernel(x) == "nf4_bnb"
        assert sqnr_db(m(x), fast(x)) > 100


def test_from_linear_state_dict_and_module_to(weight):
    lin = torch.nn.Linear(512, 256)
    p = F.quantize_rtn(lin.weight.detach(), FormatSpec("int4", group_size=128))
    m = QLinear.from_linear(lin, p)
    assert torch.equal(m.bias, lin.bias.detach())
    assert set(m.state_dict()) == {"qdata", "scale", "zero_point", "bias"}
    clone = QLinear(F.quantize_rtn(torch.zeros(256, 512), p.spec), torch.zeros(256))
    clone.load_state_dict(m.state_dict())
    x = torch.randn(3, 512)
    assert torch.equal(clone(x), m(x))
    assert m.to("meta").qdata.device.type == "meta"
    with pytest.raises(FormatError, match="linear weight"):
        QLinear.from_linear(torch.nn.Linear(64, 256), p)




def test_metrics():
    ref = torch.randn(1000, dtype=torch.float64)
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)
    assert cosine(ref, 3 * ref) == pytest.approx(1.0)
    psnr = psnr_db(torch.tensor([0.0, 1.0]), torch.tensor([0.1, 1.0]), data_range=1.0)
    assert psnr == pytest.approx(23.0103, abs=1e-3)  # 10·log10(1 / 0.005)
    with pytest.raises(ValueError, match="shape mismatch"):
        sqnr_db(ref, ref[:10])


# --- CUDA kernels against the CPU reference paths ---------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("key", ["int8_w8a8", "fp8_w8a8", "int4_g64", "nf4", "int8"])
def test_cuda_paths_match_cpu_reference(key, weight):
    ref_m, p, bias = _module(key, weight)
    cuda_m = QLinear(p, bias).cuda()
    for n in (1, 5, 33):
        x = torch.randn(n, 512)
        y = cuda_m(x.cuda().bfloat16()).float().cpu()
        ref = ref_m(x.bfloat16()).float()
        # int32 accumulation is exact, so int8 W8A8 differs only by bf16 output rounding.
        assert sqnr_db(ref, y) > (40 if key != "int8_w8a8" else 45), cuda_m.kernel(x.cuda())


@pytest.mark.gpu
@gpu
def test_fp8_scaled_mm_is_used_where_available(weight):
    m = QLinear(F.quantize_rtn(weight, SPECS["fp8_w8a8"][0])).cuda()
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    expected = "fp8_scaled_mm" if torch.cuda.get_device_capability() >= (8, 9) else "fp8_w8a8_reference"
    assert m.kernel(x) == expected
