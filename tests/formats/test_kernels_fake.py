"""Every CUDA branch of `QLinear.forward` runs on fake CUDA tensors at Lance's real Linear shapes,
for decode and denoise row counts, and takes the kernel the `formats/qlinear.py` table names.

Under torch's `FakeTensorMode` nothing is computed: each CUDA kernel's meta function checks shapes,
dtypes and operand layouts (the fake-CUDA rehearsal, `runtime/fake_cuda.py`, runs the same code).
The tests below show that the metas catch a wrong layout, and check what the `_int_mm` meta does not:
cuBLAS's int8 GEMM wants more than 16 rows and a contiguous second operand.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lance_deploy import formats as F
from lance_deploy.formats import qlinear as Q
from lance_deploy.formats.qlinear import QLinear, assume_capability
from lance_deploy.runtime.fake_cuda import install_device_guard

W8A8 = "dynamic_per_token"
# hidden 2048, 16 q heads / 2 kv heads of 128, intermediate 11008 (lance.md §1): q/o, k/v, gate/up, down
SHAPES = {"q_o": (2048, 2048), "k_v": (256, 2048), "gate_up": (11008, 2048), "down": (2048, 11008)}
ROWS = (1, 16, 4096)  # decode (one token; a 16-row batch) and a denoise chunk
SPECS = {
    "bf16": F.FormatSpec("bf16"),
    "fp8": F.FormatSpec("fp8_e4m3"),
    "fp8_w8a8": F.FormatSpec("fp8_e4m3", activations=W8A8),
    "int8": F.FormatSpec("int8"),
    "int8_w8a8": F.FormatSpec("int8", activations=W8A8),
    "int4_g128": F.FormatSpec("int4", group_size=128),
    "int4_g64_sym": F.FormatSpec("int4", group_size=64, symmetric=True),
    "nf4": F.FormatSpec("nf4"),
}
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
H100, A100, T4 = (9, 0), (8, 0), (7, 5)


def expected_kernel(key: str, rows: int, cap: tuple[int, int]) -> str:
    """The qlinear.py docstring table, written out."""
    if key == "bf16":
        return "linear"
    if key == "fp8_w8a8":
        return "fp8_scaled_mm" if cap >= (8, 9) else "fp8_w8a8_reference"
    if key == "int8":
        return "int8_weight_mm" if rows <= Q.DECODE_ROWS else "dequant_matmul"
    if key == "int8_w8a8":
        return "int8_int_mm"
    if key.startswith("int4"):
        return "int4_tinygemm" if cap >= (8, 0) else "dequant_matmul"
    if key == "nf4":
        return "nf4_bnb" if HAS_BNB else "dequant_matmul"
    return "dequant_matmul"  # fp8 weight-only


@pytest.fixture
def fake():
    install_device_guard()
    with FakeTensorMode() as mode:
        yield mode


def fake_module(shape: tuple[int, int], spec: F.FormatSpec) -> QLinear:
    """A QLinear whose packed fields (the format's layout table) and bias are fake CUDA tensors."""
    fields = {k: torch.empty(s, dtype=d, device="cuda") for k, (s, d) in F.layout(shape, spec).items()}
    fields.setdefault("scale", None)
    packed = F.PackedTensor(spec=spec, shape=shape, **fields)
    return QLinear(packed, torch.empty(shape[0], dtype=torch.bfloat16, device="cuda"))


@pytest.mark.parametrize("cap", [H100, A100, T4], ids=["sm90", "sm80", "sm75"])
@pytest.mark.parametrize("key", list(SPECS))
def test_each_cuda_path_runs_at_release_shapes(fake, key, cap):
    with assume_capability(cap):
        for shape in SHAPES.values():
            m = fake_module(shape, SPECS[key])
            plain = m._field_bytes()
            added = m.prepare(torch.device("cuda"))
            # the planner counts the plain packed fields (formats.nbytes); a repacked layout never exceeds them
            assert added <= 0 and plain + added <= F.nbytes(shape, SPECS[key])
            for rows in ROWS:
                x = torch.empty(rows, shape[1], dtype=torch.bfloat16, device="cuda")
                assert m.kernel(x) == expected_kernel(key, rows, cap), (shape, rows)
                y = m(x)
                assert y.device.type == "cuda" and y.dtype == torch.bfloat16 and tuple(y.shape) == (rows, shape[0])


def test_prepare_picks_the_layout_of_the_gpu(fake):
    with assume_capability(H100):
        assert fake_module(SHAPES["q_o"], SPECS["int4_g128"]).prepare("cuda") < 0  # uint8 zero points dropped
        for key, layout in (("int4_g128", "int4_tinygemm"), ("int8_w8a8", "int8_t"), ("fp8_w8a8", None)):
            m = fake_module(SHAPES["q_o"], SPECS[key])
            m.prepare("cuda")
            assert m.prepared == layout
    with assume_capability(T4):  # tinygemm needs sm80
        m = fake_module(SHAPES["q_o"], SPECS["int4_g128"])
        assert m.prepare("cuda") == 0 and m.prepared is None


def test_a_wrong_operand_layout_raises(fake):
    x = torch.empty(16, 2048, dtype=torch.bfloat16, device="cuda")
    q = torch.empty(2048, 2048, dtype=torch.float8_e4m3fn, device="cuda")
    s = torch.empty(2048, 1, dtype=torch.float32, device="cuda")
    assert Q._fp8_scaled_mm(x, q.t(), s).shape == (16, 2048)  # qdata [out, in] transposed as a view: column-major
    with pytest.raises(RuntimeError, match="col_major"):
        Q._fp8_scaled_mm(x, q.t().contiguous(), s)  # row-major [in, out]
    codes = torch.empty(2048, 1024, dtype=torch.uint8, device="cuda")  # plain nibbles, not tinygemm's tiles
    sz = torch.empty(16, 2048, 2, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="4D"):
        torch.ops.aten._weight_int4pack_mm(x, codes, 128, sz)


def test_int8_gemm_gets_what_cublas_needs(fake, monkeypatch):
    seen, real = [], torch._int_mm

    def record(a, b):
        seen.append((a.shape[0], b.is_contiguous()))
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", record)
    for prepared in (True, False):
        m = fake_module(SHAPES["k_v"], SPECS["int8_w8a8"])
        if prepared:
            m.prepare("cuda")
        for rows in ROWS:
            seen.clear()
            assert tuple(m(torch.empty(rows, 2048, dtype=torch.bfloat16, device="cuda")).shape) == (rows, 256)
            assert seen == [(max(rows, 17), True)]
