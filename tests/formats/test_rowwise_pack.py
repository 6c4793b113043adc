"""fp8 / int8 RTN packing in row blocks (formats/base.rowwise) gives the same bytes as the
whole-tensor formula it replaced, for any row count and with zero rows and extreme values."""

from __future__ import annotations

import pytest
import torch

from lance_deploy.formats import FormatSpec, base, quantize_rtn

WHOLE = {  # the formulas as written before packing went row-block-wise
    "fp8_e4m3": (448.0, lambda w, s: (w.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)),
    "int8": (127.0, lambda w, s: torch.round(w.float() / s).clamp_(-127, 127).to(torch.int8)),
}


@pytest.mark.parametrize("fmt", sorted(WHOLE))
@pytest.mark.parametrize("shape", [(1, 7), (37, 300), (300, 37), (257, 1024)])
def test_row_blocks_match_the_whole_tensor_formula(monkeypatch, fmt, shape):
    monkeypatch.setattr(base, "ROW_BLOCK_ELEMENTS", 1000)  # many blocks, a ragged last one
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    w = torch.randn(shape, generator=g) * torch.logspace(-6, 6, shape[0]).unsqueeze(1)
    w[shape[0] // 2] = 0.0  # an all-zero row keeps its scale floor
    if shape[0] > 2:
        w[1, 0] = 3e38  # the largest row value sets the scale, every other code shrinks
    qmax, codes = WHOLE[fmt]
    scale = (w.float().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    p = quantize_rtn(w, FormatSpec(fmt))
    assert torch.equal(p.scale, scale)
    assert torch.equal(p.qdata.view(torch.uint8), codes(w, scale).view(torch.uint8))


def test_bf16_weights_pack_as_their_fp32_values():
    w = torch.randn(64, 4096).to(torch.bfloat16)
    for fmt in WHOLE:
        a, b = quantize_rtn(w, FormatSpec(fmt)), quantize_rtn(w.float(), FormatSpec(fmt))
        assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8)) and torch.equal(a.scale, b.scale)
