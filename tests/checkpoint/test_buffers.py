"""`BufferPool`: a buffer is handed out again only once no tensor shares it (views, Parameters and
numpy arrays of it included), idle buffers beyond the cap are freed oldest first, and codes packed
into pooled buffers (`formats.base.host_buffers`) equal codes packed into fresh ones."""

from __future__ import annotations

import torch

from lance_deploy.checkpoint.buffers import SIZE_UNIT, BufferPool
from lance_deploy.formats import fp8, int8
from lance_deploy.formats.base import FormatSpec, host_buffers


def test_a_buffer_is_reused_only_when_nothing_holds_it():
    pool = BufferPool(idle_bytes=8 * SIZE_UNIT)
    a = pool.take(SIZE_UNIT)
    w = torch.nn.Parameter(a.view(torch.float32).reshape(-1, 4), requires_grad=False)
    del a
    b = pool.take(SIZE_UNIT)  # `w` still shares the first buffer
    assert pool.allocated == 2 and b.data_ptr() != w.data_ptr()
    arr = w.numpy()
    del w
    assert pool.take(SIZE_UNIT).data_ptr() not in (b.data_ptr(), arr.ctypes.data)
    del arr  # now the first buffer is idle
    first = pool.take(SIZE_UNIT - 10)  # the same size class: whole MiB
    assert pool.reused == 1 and pool.allocated == 3
    assert first.numel() == SIZE_UNIT - 10


def test_idle_buffers_beyond_the_cap_are_freed_oldest_first():
    pool = BufferPool(idle_bytes=2 * SIZE_UNIT)
    taken = [pool.take(SIZE_UNIT) for _ in range(4)]
    del taken
    assert pool.idle() == 4 * SIZE_UNIT
    big = pool.take(3 * SIZE_UNIT)  # a new size: the idle ones are trimmed to the cap first
    assert pool.idle() == 2 * SIZE_UNIT and big.numel() == 3 * SIZE_UNIT


def test_pooled_codes_equal_fresh_codes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 4096, generator=g)  # several row blocks
    pool = BufferPool(idle_bytes=64 * SIZE_UNIT)
    for fmt, name in ((fp8, "fp8_e4m3"), (int8, "int8")):
        spec = FormatSpec(name)
        scale, _ = fmt.params(w, spec)
        fresh = fmt.pack(w, scale, None, spec).qdata
        for _ in range(2):  # the second pack reuses the first one's freed buffer
            with host_buffers(pool.take):
                pooled = fmt.pack(w, scale, None, spec).qdata
            assert pooled.dtype == fresh.dtype and torch.equal(pooled.view(torch.uint8), fresh.view(torch.uint8))
            del pooled
    assert pool.reused >= 2
