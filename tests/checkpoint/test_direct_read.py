"""`SafetensorsReader(direct=True)`: big tensors read with O_DIRECT give the same values as the
buffered reads, at any offset the file puts them (also the last one, whose aligned window runs
past the end of the file), and a filesystem that refuses O_DIRECT falls back to buffered reads."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from lance_deploy.checkpoint import safetensors_io as sio
from lance_deploy.checkpoint.safetensors_io import DIRECT_MIN_BYTES, SafetensorsReader


@pytest.fixture
def tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = {"a.norm": torch.randn(7, generator=g),  # a few bytes: shifts what follows off the page grid
              "b.weight": torch.randn(1 + DIRECT_MIN_BYTES // 4, 3, generator=g),
              "c.half": torch.randn(513, 1031, generator=g).to(torch.bfloat16),
              "d.last": torch.randn(DIRECT_MIN_BYTES // 4 + 5, generator=g)}
    path = tmp_path / "m.safetensors"
    save_file(values, str(path))
    return path, values


def test_direct_reads_match_buffered_reads(tensors):
    path, values = tensors
    with SafetensorsReader(path, direct=True) as direct:
        if direct._direct < 0:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert {direct.info(k).offset % sio.ALIGN for k in ("b.weight", "d.last")} != {0}
        for name, want in values.items():
            got = direct.read(name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
            if got.nbytes >= DIRECT_MIN_BYTES:  # a view into an aligned buffer at most 3 pages larger
                assert got.untyped_storage().nbytes() - got.nbytes <= 3 * sio.ALIGN
        assert torch.equal(direct.read("b.weight", dtype=torch.bfloat16), values["b.weight"].bfloat16())


def test_a_refused_direct_read_falls_back_to_buffered(tensors, monkeypatch):
    path, values = tensors
    real = os.preadv

    def refuse(fd, buffers, offset):
        if fd == reader._direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    reader = SafetensorsReader(path, direct=True)
    monkeypatch.setattr(os, "preadv", refuse)
    with reader:
        assert torch.equal(reader.read("b.weight"), values["b.weight"])
        assert reader._direct == -1 and torch.equal(reader.read("d.last"), values["d.last"])


def test_no_direct_descriptor_where_the_filesystem_has_none(tensors, monkeypatch):
    path, values = tensors
    monkeypatch.setattr(sio, "open_direct", lambda p: -1)
    with SafetensorsReader(path, direct=True) as reader:
        assert reader._direct == -1 and torch.equal(reader.read("b.weight"), values["b.weight"])
