"""Rules between the records of a parsed ``manifest.json``: what ``ArtifactWriter`` guarantees and
the reader therefore demands. Each record was type-checked on its own by ``manifest.py``; here
they must agree with each other (unique names, groups that hold their tensors' bytes exactly,
no overlapping fields) and each tensor with its format's field table (``formats.layout``).
"""

from __future__ import annotations

import torch

from lance_deploy import formats
from lance_deploy.checkpoint.safetensors_io import dtype_tag
from lance_deploy.core.schema import fail
from lance_deploy.formats import FormatError, FormatSpec

PLAIN_FIELD = "tensor"  # the one field of a tensor stored as it is (not packed)


def _unique(names: list[str], what: str, where: str) -> None:
    first: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in first:
            raise fail(where, f"{what}[{first[n]}] and {what}[{i}] both name {n!r}")
        first[n] = i


def check_records(m, where: str) -> None:
    """Raise SchemaError naming the first record of `m` (a `manifest.ArtifactManifest`, which calls
    these checks) that breaks a rule."""
    if not m.tensors:
        raise fail(where, "tensors: empty; a sealed artifact holds at least one tensor")
    _unique([t.name for t in m.tensors], "tensors", where)
    _unique([g.name for g in m.groups], "groups", where)
    groups = {g.name: (i, g) for i, g in enumerate(m.groups)}
    spans: dict[str, list[tuple[int, int]]] = {g.name: [] for g in m.groups}
    for i, t in enumerate(m.tensors):
        at = f"{where}: tensors[{i}] ({t.name})"
        if t.group not in groups:
            raise fail(f"{at}.group", f"{t.group!r} is not one of the manifest's groups")
        if t.shard != groups[t.group][1].shard:
            raise fail(f"{at}.shard", f"{t.shard!r} is not its group's shard {groups[t.group][1].shard!r}")
        check_format(t, at)
        spans[t.group] += [(f.offset, f.offset + f.nbytes) for f in t.fields.values()]
    for name, (i, g) in groups.items():
        at = f"{where}: groups[{i}] ({name})"
        got = sorted(spans[name])
        if not got:
            raise fail(at, "holds no tensor")
        for (_, end), (begin, _) in zip(got, got[1:]):
            if begin < end:
                raise fail(at, f"two of its tensors' fields overlap at byte {begin} of {g.shard}")
        lo, hi = got[0][0], max(e for _, e in got)
        if (g.data_offset, g.nbytes) != (lo, hi - lo):
            raise fail(at, f"data_offset/nbytes {g.data_offset}/{g.nbytes} do not span its tensors' bytes "
                       f"exactly ({lo}/{hi - lo})")


def check_format(t, at: str) -> None:  # t: a manifest.TensorRecord
    """A tensor's format, spec, logical shape and stored fields must agree, as the writer makes them."""
    if t.spec is None:
        if set(t.fields) != {PLAIN_FIELD}:
            raise fail(f"{at}.fields", f"a plain tensor stores one field {PLAIN_FIELD!r}, got {sorted(t.fields)}")
        f = t.fields[PLAIN_FIELD]
        if t.format != f.dtype.lower():
            raise fail(f"{at}.format", f"a plain tensor's format is its dtype ({f.dtype.lower()!r}), got {t.format!r}")
        if f.shape != t.shape:
            raise fail(f"{at}.fields.{PLAIN_FIELD}.shape", f"{list(f.shape)} is not the tensor's shape {list(t.shape)}")
        return
    try:
        spec = FormatSpec.from_dict(t.spec)
        table = dict(formats.layout(t.shape, spec))
    except (FormatError, TypeError) as e:
        raise fail(f"{at}.spec", str(e).splitlines()[0][:200]) from None
    if t.format != spec.name:
        raise fail(f"{at}.format", f"{t.format!r} is not its spec's format {spec.name!r}")
    if "smooth" in t.fields:
        table["smooth"] = ((t.shape[1],), torch.float32)
    if set(t.fields) != set(table):
        raise fail(f"{at}.fields", f"{spec.label} stores {sorted(table)}, got {sorted(t.fields)}")
    for k, (shape, dtype) in table.items():
        f, want = t.fields[k], {dtype_tag(dtype)} | ({"BF16"} if k == "scale" else set())
        if f.dtype not in want or f.shape != tuple(shape):
            raise fail(f"{at}.fields.{k}", f"{f.dtype}{list(f.shape)} does not fit {spec.label} of shape "
                       f"{list(t.shape)} (expected {dtype_tag(dtype)}{list(shape)})")
