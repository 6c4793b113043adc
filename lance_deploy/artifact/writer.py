"""Write a quantized artifact folder (``exported/<name>/``) atomically, one shard per group.

A group is one expert's layer range (``und-000-011``, ``gen-012-023``; 12 layers by default) or
``shared`` / ``vit`` / ``vae``: the unit ``ArtifactReader.read_group`` loads with one positioned read. Each shard is
streamed with ``SafetensorsWriter``, which needs its entries up front, so a group is either
declared first (``declare``: tensors go straight to disk as they are added; what the quantizer
does from its plan) or buffered in memory until ``close_group`` (fine for small groups).

Everything happens in ``<out>.partial/`` (with a marker file); ``seal`` writes ``manifest.json``
last, copies the config and tokenizer, and renames the folder into place, so a half-written
artifact never looks valid. One writer per artifact (the lock ``<out>.lock``, ``core/lock.py``);
what a killed writer left behind is recognised by ``artifact/partial.py``: cleared, or kept
for a resuming quantizer (``resume``), which ``adopt``s the tensors it had finished.
``ArtifactReader`` is re-exported from ``artifact_reader``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lance_deploy import __version__, formats
from lance_deploy.artifact.manifest import (
    FIELD_ORDER,
    GROUP_NAME,
    MANIFEST_NAME,
    PLAIN_FIELD,
    PRODUCER,
    ArtifactError,
    ArtifactManifest,
    FieldRecord,
    GroupRecord,
    TensorRecord,
    check_relpath,
    field_key,
    shard_path,
)
from lance_deploy.artifact.partial import (
    PARTIAL_MARKER,
    clear_partial,
    is_resumable,
    made_by,
    marker_text,
    old_copy,
    recover_swap,
    remove_partial,
)
from lance_deploy.artifact.reader import ArtifactReader, field_bytes
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader, dtype_tag
from lance_deploy.checkpoint.safetensors_write import SafetensorsWriter
from lance_deploy.core.faults import fault_point
from lance_deploy.core.fsutil import atomic_path, sha256_file
from lance_deploy.core.lock import PathLock, held_here
from lance_deploy.formats import FormatSpec, PackedTensor

__all__ = ["COPY_FILES", "ArtifactReader", "ArtifactWriter", "TensorDecl", "group_of"]

COPY_FILES = ("llm_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "special_tokens_map.json", "added_tokens.json")
"""Copied from the source model folder when present (llm_config.json is required)."""


def group_of(name: str, layers_per_group: int = 12,
             num_layers: int | None = None) -> tuple[str, str | None, tuple[int, int] | None]:
    """(group name, expert, (first, last) layer) of a canonical tensor name."""
    layer, expert = cn.layer_of(name), cn.expert_of(name)
    if layer is not None:
        lo = layer // layers_per_group * layers_per_group
        hi = lo + layers_per_group - 1 if num_layers is None else min(lo + layers_per_group, num_layers) - 1
        return f"{expert}-{lo:03d}-{hi:03d}", expert, (lo, hi)
    for root in ("vit", "vae"):
        if name.startswith(root + "."):
            return root, None, None
    return "shared", None, None  # embeddings, lm_head, final norms, bridges


@dataclass(frozen=True)
class TensorDecl:
    """A tensor announced before it is written: (field, dtype tag, shape) per stored field."""

    name: str
    spec: FormatSpec | None
    shape: tuple[int, ...]
    fields: tuple[tuple[str, str, tuple[int, ...]], ...]

    @classmethod
    def packed(cls, name: str, spec: FormatSpec, shape: tuple[int, int], smooth: bool = False) -> TensorDecl:
        """From the format's layout table (what a plan entry will produce)."""
        table = dict(formats.layout(tuple(shape), spec))
        if smooth:
            table["smooth"] = ((shape[1],), torch.float32)
        fields = tuple((f, dtype_tag(table[f][1]), tuple(table[f][0])) for f in FIELD_ORDER if f in table)
        return cls(name, spec, tuple(shape), fields)

    @classmethod
    def plain(cls, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> TensorDecl:
        return cls(name, None, tuple(shape), ((PLAIN_FIELD, dtype_tag(dtype), tuple(shape)),))

    @classmethod
    def from_plan_entry(cls, entry) -> TensorDecl:
        """What a ``quant.plan.PlanEntry`` will store: packed (with ``smooth`` if planned) or plain bf16."""
        if entry.packed:
            return cls.packed(entry.name, entry.spec(), entry.shape, smooth=entry.smooth)
        return cls.plain(entry.name, torch.bfloat16, entry.shape)

    @classmethod
    def of(cls, name: str, value: PackedTensor | torch.Tensor) -> TensorDecl:
        spec, shape, tensors = _split(name, value)
        return cls(name, spec, shape, tuple((f, dtype_tag(t.dtype), tuple(t.shape)) for f, t in tensors.items()))


def _split(name: str, value: PackedTensor | torch.Tensor) -> tuple[FormatSpec | None, tuple[int, ...], dict]:
    if isinstance(value, PackedTensor):
        formats.validate(value, name)
        t = value.tensors()
        return value.spec, tuple(value.shape), {f: t[f] for f in FIELD_ORDER if f in t}
    if isinstance(value, torch.Tensor):
        return None, tuple(value.shape), {PLAIN_FIELD: value}
    raise ArtifactError(f"{name}: expected a PackedTensor or a torch.Tensor, got {type(value).__name__}")


_key = field_key


@dataclass
class _Shard:
    group: str
    expert: str | None
    layers: tuple[int, int] | None
    rel: str
    writer: SafetensorsWriter | None = None  # declared groups stream; None = buffered
    decls: dict[str, TensorDecl] = field(default_factory=dict)
    buffer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, tuple[FormatSpec | None, tuple[int, ...], tuple[str, ...]]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


class ArtifactWriter:
    """Build ``out_dir`` in ``out_dir.partial/``; ``seal`` moves it into place (see module doc)."""

    def __init__(self, out_dir: str | os.PathLike, *, overwrite: bool = False, layers_per_group: int = 12,
                 num_layers: int | None = None, owner: Mapping[str, Any] | None = None, resume: str | None = None):
        """``owner``: manifest values (source, recipe, created) that prove a leftover sealed
        ``OUT.partial`` is this job's own (``artifact/partial.py``). ``resume``: an id of the run
        (a quantize job's); its declared shards survive a kill (``SafetensorsWriter(resumable=True)``),
        and an unsealed ``OUT.partial`` marked with the same id is kept (``resumed``), so the run
        ``adopt``s what it had finished."""
        self.out_dir = Path(out_dir)
        self.partial = self.out_dir.with_name(self.out_dir.name + ".partial")
        self.overwrite, self.layers_per_group, self.num_layers = overwrite, layers_per_group, num_layers
        # one writer per artifact; a caller that already holds OUT's lock (quantize) keeps it
        self._lock = None if held_here(self.out_dir) else PathLock(self.out_dir, "--out").acquire()
        try:
            notes = [recover_swap(self.out_dir)]
            if self.out_dir.exists() and not overwrite and made_by(self.out_dir, owner):
                raise ArtifactError(f"{self.out_dir}: already holds this job's sealed artifact; nothing to resume "
                                    "(pass --overwrite to rebuild it)")
            _check_replaceable(self.out_dir, overwrite)
            self.resume = resume
            self.resumed = is_resumable(self.partial, resume)
            if self.resumed:
                notes.append(f"{self.partial}: resumed the unsealed folder of this job's interrupted run")
            else:
                notes.append(clear_partial(self.partial, self.out_dir, owner))
                self.partial.mkdir(parents=True)  # killed here: an empty folder, removed next time
                (self.partial / PARTIAL_MARKER).write_text(marker_text(resume))
            (self.partial / "weights").mkdir(exist_ok=True)
        except BaseException:
            self._release()
            raise
        self.recovered = "; ".join(n for n in notes if n) or None  # what a killed run had left, and what became of it
        fault_point("artifact.partial-created")
        self._open: dict[str, _Shard] = {}
        self._closed: dict[str, GroupRecord] = {}
        self._records: dict[str, TensorRecord] = {}
        self._amax: dict[str, float] = {}  # W8A8 weight -> calibrated input amax (static Q/DQ scales)

    def _shard(self, name: str, group: str | None) -> _Shard:
        g, expert, layers = group_of(name, self.layers_per_group, self.num_layers)
        group = group or g
        if not GROUP_NAME.fullmatch(group):
            raise ArtifactError(f"group name {group!r} must be lower-case letters, digits and '-'")
        if group in self._closed:
            raise ArtifactError(f"{name}: group {group!r} is already closed (its shard is written)")
        if group not in self._open:
            self._open[group] = _Shard(group, expert, layers, shard_path(group))
        return self._open[group]

    def declare(self, group: str, decls: Iterable[TensorDecl]) -> None:
        """Fix a group's tensors (in this order) so ``add`` streams them straight into its shard."""
        decls = list(decls)
        if not decls:
            raise ArtifactError(f"group {group!r}: nothing declared")
        if group in self._open:
            raise ArtifactError(f"group {group!r} already has tensors; declare a group before adding to it")
        shard = self._shard(decls[0].name, group)
        shard.decls = {d.name: d for d in decls}
        entries = [(_key(d.name, f), dtype, shape) for d in decls for f, dtype, shape in d.fields]
        # tensors hashed one by one; O_DIRECT: no page-cache copy of 9 GB (checkpoint/direct_io.py)
        shard.writer = SafetensorsWriter(self.partial / shard.rel, entries, hash_file=False,
                                         resumable=self.resume is not None, direct=True)

    def declare_plan(self, entries: Iterable) -> list[str]:
        """Declare every group of a resolved plan (``QuantPlan.entries``; 'skip' entries are left
        out): each tensor then streams to disk as it is added, and each group's shard closes
        itself once complete. Returns the group names."""
        by_group: dict[str, list[TensorDecl]] = {}
        for e in entries:
            if e.format != "skip":
                group = group_of(e.name, self.layers_per_group, self.num_layers)[0]
                by_group.setdefault(group, []).append(TensorDecl.from_plan_entry(e))
        for group, decls in by_group.items():
            self.declare(group, decls)
        return list(by_group)

    def add(self, name: str, value: PackedTensor | torch.Tensor, group: str | None = None,
            activation_amax: float | None = None) -> None:
        """Store one tensor (canonical ``name``) in its group (default: ``group_of(name)``);
        ``activation_amax``: a W8A8 weight's calibrated per-tensor input amax (recorded in its record)."""
        if name in self._records or any(name in s.meta for s in self._open.values()):
            raise ArtifactError(f"{name}: added twice")
        cn.to_release(name)  # refuses non-canonical names early
        shard = self._shard(name, group)
        spec, shape, tensors = _split(name, value)
        if activation_amax is not None:
            if spec is None or spec.activations is None:
                raise ArtifactError(f"{name}: activation_amax is only recorded for W8A8 weights")
            self._amax[name] = float(activation_amax)
        got = TensorDecl(name, spec, shape, tuple((f, dtype_tag(t.dtype), tuple(t.shape)) for f, t in tensors.items()))
        if shard.writer is not None:
            decl = shard.decls.get(name)
            if decl is None:
                raise ArtifactError(f"{name}: not declared for group {shard.group!r}")
            if got != decl:
                raise ArtifactError(f"{name}: does not match its declaration (declared {decl}, got {got})")
            for f, t in tensors.items():
                shard.writer.write(_key(name, f), t)
            fault_point("artifact.tensor-written")
        else:
            shard.buffer[name] = {f: t.detach().cpu() for f, t in tensors.items()}
        h = hashlib.sha256()
        for t in tensors.values():
            h.update(field_bytes(t))
        shard.meta[name], shard.hashes[name] = (spec, shape, tuple(tensors)), h.hexdigest()
        if shard.writer is not None and len(shard.meta) == len(shard.decls):
            self.close_group(shard.group)

    def adopt(self, name: str, sha256: str, activation_amax: float | None = None) -> None:
        """Take declared tensor `name` as already in its shard (a resumed run's finished layer)
        instead of adding it: its bytes are read back and must hash to `sha256`, what `add`
        recorded for them (``tensor_sha256``) before the kill."""
        shard = self._shard(name, None)
        decl = shard.decls.get(name)
        if shard.writer is None or decl is None or not shard.writer.resumed:
            raise ArtifactError(f"{name}: not in a reopened shard of a resumed artifact; nothing to adopt")
        if name in shard.meta:
            raise ArtifactError(f"{name}: added twice")
        h = hashlib.sha256()
        for f, _, _ in decl.fields:
            h.update(shard.writer.adopt(_key(name, f)))
        if h.hexdigest() != sha256:
            raise ArtifactError(f"{self.partial / shard.rel}: {name} no longer holds the bytes this job wrote; "
                                "pass --restart to quantize again from the start")
        if activation_amax is not None:
            self._amax[name] = float(activation_amax)
        shard.meta[name], shard.hashes[name] = (decl.spec, decl.shape, tuple(f for f, _, _ in decl.fields)), sha256
        if len(shard.meta) == len(shard.decls):
            self.close_group(shard.group)

    def tensor_sha256(self, name: str) -> str:
        """The sha256 `add` recorded for `name` (what `adopt` checks on a resume)."""
        for shard in self._open.values():
            if name in shard.hashes:
                return shard.hashes[name]
        return self._records[name].sha256

    def sync(self) -> None:
        """Make every tensor added so far durable (closed shards already are)."""
        for shard in self._open.values():
            if shard.writer is not None:
                shard.writer.sync()

    def close_group(self, group: str) -> GroupRecord:
        """Finish a group's shard (buffered groups are written now) and record its tensors."""
        shard = self._open.get(group)
        if shard is None:
            raise ArtifactError(f"group {group!r} is not open")
        if shard.writer is not None:
            missing = [n for n in shard.decls if n not in shard.meta]
            if missing:
                raise ArtifactError(f"group {group!r}: {len(missing)} declared tensors never added "
                                    f"(first: {missing[0]})")
            shard.writer.close()
        else:
            names = sorted(shard.buffer, key=cn.sort_key)
            entries = [(_key(n, f), t.dtype, tuple(t.shape)) for n in names for f, t in shard.buffer[n].items()]
            with SafetensorsWriter(self.partial / shard.rel, entries) as w:
                for n in names:
                    for f, t in shard.buffer.pop(n).items():
                        w.write(_key(n, f), t)
        del self._open[group]
        self._closed[group] = self._record(shard)
        fault_point("artifact.group-closed")
        return self._closed[group]

    def _record(self, shard: _Shard) -> GroupRecord:
        with SafetensorsReader(self.partial / shard.rel) as r:
            infos = r.infos()
        for name, (spec, shape, names) in shard.meta.items():
            flds = {f: FieldRecord(k, infos[k].dtype, infos[k].shape, infos[k].offset, infos[k].nbytes)
                    for f in names for k in [_key(name, f)]}
            fmt = spec.name if spec is not None else flds[PLAIN_FIELD].dtype.lower()  # plain: 'bf16', 'f32'
            self._records[name] = TensorRecord(name, cn.to_release(name), shard.group, shard.rel, fmt,
                                               None if spec is None else spec.to_dict(), shape, flds,
                                               shard.hashes[name], self._amax.get(name))
        start = min(i.offset for i in infos.values())
        end = max(i.offset + i.nbytes for i in infos.values())
        return GroupRecord(shard.group, shard.expert, shard.layers, shard.rel, start, end - start)

    def seal(self, *, source: Mapping[str, Any], recipe: Mapping[str, Any],
             calibration: Mapping[str, Any] | None = None, quality: Mapping[str, Any] | None = None,
             created: str | None = None,
             source_dir: str | os.PathLike | None = None,
             extra_files: Mapping[str, str | os.PathLike] | None = None) -> ArtifactManifest:
        """Close open groups, copy model files, write manifest.json last, move the folder into place.

        ``created`` defaults to now; a resumable job passes its own start time so a resumed run
        writes a byte-identical manifest.
        """
        for group in list(self._open):
            self.close_group(group)
        if not self._records:
            raise ArtifactError(f"{self.out_dir}: no tensors were added; nothing to seal")
        files = self._copy_files(source_dir, extra_files or {})
        fault_point("artifact.files-copied")
        tensors = sorted(self._records.values(), key=lambda t: cn.sort_key(t.name))
        order = list(dict.fromkeys(t.group for t in tensors))
        manifest = ArtifactManifest(
            producer={"name": PRODUCER, "version": __version__}, source=dict(source), recipe=dict(recipe),
            tensors=tensors, groups=[self._closed[g] for g in order], files=files,
            calibration=dict(calibration or {}), quality=dict(quality or {}),
            created=created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        text = manifest.to_json()
        ArtifactManifest.from_json(text, str(self.partial / MANIFEST_NAME))  # never seal what the reader refuses
        with atomic_path(self.partial / MANIFEST_NAME) as tmp:
            tmp.write_text(text, encoding="utf-8")
        fault_point("artifact.manifest-written")
        (self.partial / PARTIAL_MARKER).unlink()
        fault_point("artifact.marker-removed")  # the seal window: partial.clear_partial() knows it by its manifest
        _move_into_place(self.partial, self.out_dir, self.overwrite)
        fault_point("artifact.sealed")
        self._release()
        return manifest

    def _copy_files(self, source_dir, extra: Mapping[str, str | os.PathLike]) -> dict[str, str]:
        files: dict[str, str] = {}
        if source_dir is not None:
            src = Path(source_dir)
            if not (src / COPY_FILES[0]).is_file():
                raise ArtifactError(f"{src}: no {COPY_FILES[0]} to copy into the artifact")
            for name in COPY_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, self.partial / name)
                    files[name] = sha256_file(self.partial / name)
        for rel, path in extra.items():
            check_relpath(rel, f"extra_files {rel!r}")
            (self.partial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.partial / rel)
            files[rel] = sha256_file(self.partial / rel)
        return files

    def abort(self) -> None:
        """Drop the partial folder; nothing appears at ``out_dir``."""
        for shard in self._open.values():
            if shard.writer is not None:
                shard.writer.abort()
        self._open.clear()
        try:
            remove_partial(self.partial)
        except OSError:
            pass  # abort runs while another error propagates; the next writer clears the rest
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise ArtifactError(f"{out_dir}: already exists; pass --overwrite to replace it")
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not an artifact folder; refusing to replace it")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ArtifactError(f"{out_dir}: exists, is not empty and has no {MANIFEST_NAME}; refusing to replace it")


def _move_into_place(partial: Path, out_dir: Path, overwrite: bool) -> None:
    _check_replaceable(out_dir, overwrite)
    _fsync_dir(partial)
    old = old_copy(out_dir)
    if out_dir.exists():
        os.replace(out_dir, old)  # the old artifact stays whole until the new one is in place
        fault_point("artifact.old-moved")  # killed here: partial.recover_swap() puts it back
    os.replace(partial, out_dir)
    _fsync_dir(out_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
