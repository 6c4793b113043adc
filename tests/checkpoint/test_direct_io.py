"""O_DIRECT writes gathered in an aligned buffer (`checkpoint/direct_io.py`): the file holds
exactly the bytes a plain writer gives, in order or not, across syncs (a partial block written
buffered, then completed), on a reopened file, and where O_DIRECT is refused."""

from __future__ import annotations

import errno
import os
import random

import pytest
import torch

from lance_deploy.checkpoint import direct_io
from lance_deploy.checkpoint.direct_io import ALIGN, DirectWrites
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.checkpoint.safetensors_write import SafetensorsWriter


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 1000, ALIGN + 5, 7, 5 * ALIGN, 2 * ALIGN - 1, 1 << 16]
    return {f"t{i}": torch.randint(-100, 100, (n,), generator=g, dtype=torch.int8) for i, n in enumerate(sizes)}


def _write(path, tensors, order, *, direct: bool, sync_every: int = 0, stage: int | None = None, monkeypatch=None):
    if stage is not None:
        monkeypatch.setattr(direct_io, "STAGE_BYTES", stage)
    w = SafetensorsWriter(path, [(k, t.dtype, t.shape) for k, t in tensors.items()], direct=direct)
    for i, name in enumerate(order):
        w.write(name, tensors[name])
        if sync_every and i % sync_every == 0:
            w.sync()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("sync_every", [0, 1, 3])
def test_direct_writes_give_the_plain_writers_bytes(tmp_path, monkeypatch, shuffle, sync_every):
    tensors = _tensors()
    order = list(tensors)
    if shuffle:
        random.Random(1).shuffle(order)
    plain = _write(tmp_path / "plain.safetensors", tensors, order, direct=False)
    got = _write(tmp_path / "direct.safetensors", tensors, order, direct=True, sync_every=sync_every,
                 stage=4 * ALIGN, monkeypatch=monkeypatch)  # a small buffer: it fills and drains mid-tensor
    assert got == plain
    with SafetensorsReader(tmp_path / "direct.safetensors") as r:
        assert all(torch.equal(r.read(k), t) for k, t in tensors.items())


def test_the_writes_use_o_direct_where_the_filesystem_allows(tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    fd = direct_io.open_direct(probe, write=True)
    if fd < 0:
        pytest.skip("this filesystem refuses O_DIRECT")
    os.close(fd)
    w = SafetensorsWriter(tmp_path / "a.safetensors", [("x", torch.int8, (8,))], direct=True)
    assert w._direct is not None and w._direct.direct_fd >= 0
    w.write("x", torch.arange(8, dtype=torch.int8))
    w.close()


def test_a_new_run_reads_its_first_block_back_from_the_file(tmp_path):
    path = tmp_path / "f"
    original = bytes(random.Random(2).randrange(256) for _ in range(3 * ALIGN + 100))
    path.write_bytes(original)
    fd = os.open(path, os.O_RDWR)
    writes = DirectWrites(fd, direct_io.open_direct(path, write=True), stage_bytes=2 * ALIGN)
    patch = b"\xff" * (ALIGN + 10)
    writes.write(patch, ALIGN + 50)  # inside a block, across the next boundary
    writes.write(b"\x01\x02", 7)  # elsewhere: the first run is flushed first
    writes.close()
    os.close(fd)
    want = bytearray(original)
    want[ALIGN + 50:ALIGN + 50 + len(patch)] = patch
    want[7:9] = b"\x01\x02"
    assert path.read_bytes() == bytes(want)


def test_a_refused_direct_write_falls_back_to_buffered(tmp_path, monkeypatch):
    tensors = _tensors(3)
    real = os.pwrite
    w = SafetensorsWriter(tmp_path / "a.safetensors", [(k, t.dtype, t.shape) for k, t in tensors.items()],
                          direct=True)
    dfd = w._direct.direct_fd if w._direct is not None else -2

    def refuse(fd, data, offset):
        if fd == dfd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse)
    for k, t in tensors.items():
        w.write(k, t)
    w.close()
    monkeypatch.undo()
    assert (tmp_path / "a.safetensors").read_bytes() == _write(tmp_path / "b.safetensors", tensors, list(tensors),
                                                              direct=False)
