"""`SafetensorsWriter(resumable=True)`: what a killed writer wrote survives, and a writer with the
same entries takes it back (`adopt`) instead of writing it again; the file ends byte-identical."""

from __future__ import annotations

import pytest
import torch

from lance_deploy.checkpoint.safetensors_write import SafetensorsWriter
from lance_deploy.core.errors import CheckpointError

ENTRIES = [("a", torch.float32, (4, 3)), ("b", torch.int8, (5,)), ("c", torch.bfloat16, (2, 2))]
VALUES = {"a": torch.arange(12.0).reshape(4, 3), "b": torch.arange(5, dtype=torch.int8),
          "c": torch.ones(2, 2, dtype=torch.bfloat16)}


def _straight(path):
    with SafetensorsWriter(path, ENTRIES) as w:
        for k, v in VALUES.items():
            w.write(k, v)
    return path.read_bytes()


def test_a_reopened_file_adopts_what_was_written_and_ends_identical(tmp_path):
    want = _straight(tmp_path / "want.safetensors")
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, ENTRIES, resumable=True)
    w.write("a", VALUES["a"])
    w.sync()
    w.abort()  # a kill: the temporary file stays, nothing at path
    assert not path.exists() and (tmp_path / ".x.safetensors.part").is_file()

    w = SafetensorsWriter(path, ENTRIES, resumable=True)
    assert w.resumed
    assert w.adopt("a") == VALUES["a"].numpy().tobytes()
    with pytest.raises(CheckpointError, match="already written"):
        w.adopt("a")
    w.write("b", VALUES["b"])
    w.write("c", VALUES["c"])
    w.close()
    assert path.read_bytes() == want


def test_a_finished_file_is_reopened_and_other_entries_start_over(tmp_path):
    path = tmp_path / "x.safetensors"
    want = _straight(tmp_path / "want.safetensors")
    with SafetensorsWriter(path, ENTRIES, resumable=True) as w:
        for k, v in VALUES.items():
            w.write(k, v)
    w = SafetensorsWriter(path, ENTRIES, resumable=True)  # closed before the kill: moved back and reopened
    assert w.resumed and not path.exists()
    for k in VALUES:
        w.adopt(k)
    w.close()
    assert path.read_bytes() == want

    other = SafetensorsWriter(path, ENTRIES[:2], resumable=True)  # another header: nothing kept
    assert not other.resumed
    with pytest.raises(CheckpointError, match="not reopened"):
        other.adopt("a")
    other.abort()
    (tmp_path / ".x.safetensors.part").unlink()  # a resumable writer's abort keeps it: remove it by hand
    assert not path.exists() and not (tmp_path / ".x.safetensors.part").exists()


def test_a_cut_short_tensor_is_not_adopted(tmp_path):
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, ENTRIES, resumable=True)
    w.write("a", VALUES["a"])
    w.abort()
    w = SafetensorsWriter(path, ENTRIES, resumable=True)
    with pytest.raises(CheckpointError, match="cut short"):
        w.adopt("c")  # never written: past the end of the file
