"""The fused kernel paths that have a CPU implementation match the reference path within the
format's SQNR floor (tests/formats/test_formats.py SPECS), and `prepare` repacks once, in place,
without adding bytes. The CUDA paths run at release shapes on fake CUDA in
tests/formats/test_kernels_fake.py."""

from __future__ import annotations

import pytest
import torch
from test_formats import SPECS

from lance_deploy import formats as F
from lance_deploy.formats import FormatError
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.quant.metrics import sqnr_db

MARGIN_DB = 10.0  # the kernel's deviation from the reference stays this far inside the format's own error


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) / 512**0.5


def _pair(key, weight, smooth=False):
    spec, floor = SPECS[key]
    bias = torch.randn(256, generator=torch.Generator().manual_seed(2))
    s = torch.rand(512, generator=torch.Generator().manual_seed(3)) + 0.5 if smooth else None
    p = F.quantize_rtn(weight, spec).with_smooth(s)
    return QLinear(p, bias), QLinear(p, bias, prefer_reference=True), floor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth", [False, True])
def test_int8_weight_only_uses_torchs_int8pack_kernel(weight, dtype, smooth):
    fast, ref, floor = _pair("int8", weight, smooth)
    for rows in (1, 16, 300):  # decode and denoise row counts both take it on the CPU
        x = torch.randn(rows, 512).to(dtype)
        assert fast.kernel(x) == "int8_weight_mm" and ref.kernel(x) == "dequant_matmul"
        assert sqnr_db(ref(x).float(), fast(x).float()) >= floor + MARGIN_DB


@pytest.mark.parametrize("key", ["int4_g64", "int4_g128", "int4_g64_sym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_prepared_for_the_cpu_tinygemm_matches_the_reference(weight, key, dtype):
    fast, ref, floor = _pair(key, weight)
    plain = sum(t.numel() * t.element_size() for t in fast.packed.tensors().values())
    added = fast.prepare("cpu")
    assert added <= 0 and fast.prepared == "int4_cpu" and fast.qdata is None
    assert fast.prepare("cpu") == 0  # once
    groups = 256 * 512 // SPECS[key][0].group_size
    assert plain + added == 256 * 512 // 2 + groups * 4  # tiles + a bf16 (scale, zero) per group
    x = torch.randn(2, 7, 512).to(dtype)
    assert fast.kernel(x) == "int4_cpu"
    y = fast(x)
    assert y.shape == (2, 7, 256) and y.dtype == dtype
    assert sqnr_db(ref(x).float(), y.float()) >= floor + MARGIN_DB
    with pytest.raises(FormatError, match="repacked"):
        fast.packed


def test_prepare_leaves_formats_without_a_layout_and_reference_modules_alone(weight):
    for key in ("bf16", "fp8", "fp8_w8a8", "int8", "nf4"):
        fast, ref, _ = _pair(key, weight)
        assert fast.prepare("cpu") == 0 and fast.prepared is None
    _, ref, _ = _pair("int4_g64", weight)
    assert ref.prepare("cpu") == 0 and ref.kernel(torch.zeros(1, 512)) == "dequant_matmul"


def test_int4_too_narrow_for_the_tiles_stays_plain():
    p = F.quantize_rtn(torch.randn(64, 64), F.FormatSpec("int4", group_size=32))
    m = QLinear(p)
    assert m.prepare("cpu") == 0 and m.kernel(torch.zeros(1, 64)) == "dequant_matmul"
