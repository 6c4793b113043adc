"""What an artifact writer finds at ``OUT.partial`` and ``OUT.old-*`` before it starts.

A killed run can leave, depending on where it died (``writer.seal`` runs these steps in order):

* ``OUT.partial`` with the marker file: unsealed work. A resuming quantizer keeps it when the
  marker names this very job (the run id its job folder was created with): the finished layers are in
  its shards and the job folder records their hashes. Otherwise it is cleared.
* ``OUT.partial`` without the marker but with a lance-deploy manifest: killed after the manifest
  was written and the marker removed, before the final rename. Cleared and rebuilt when the
  manifest's source and recipe are this run's: its creation time too means this very job, and
  without it (the job folder was removed) a rebuild still gives the same weights, so nothing is
  lost. Another source or recipe is refused, saying what it is.
* ``OUT`` missing and ``OUT.old-<pid>``: an ``--overwrite`` killed between its two renames; the
  previous artifact is put back. ``OUT`` present and ``OUT.old-<pid>``: the replaced artifact's
  removal was cut short; removed.

The caller holds the lock of ``OUT`` (``core/lock.py``), so nothing found here is live.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lance_deploy.artifact.manifest import MANIFEST_NAME, PRODUCER, ArtifactError

PARTIAL_MARKER = ".lance-deploy-partial"
MARKER_TEXT = "unsealed artifact; safe to delete\n"
OLD_INFIX = ".old-"
JOB_LINE = "job "


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _manifest(folder: Path) -> dict[str, Any] | None:
    """The raw manifest.json of `folder` if lance-deploy wrote it, else None."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("producer"), dict):
        return None
    return data if data["producer"].get("name") == PRODUCER else None


def made_by(folder: Path, owner: Mapping[str, Any] | None) -> bool:
    """Whether `folder`'s manifest carries `owner`'s values (source, recipe, created): this job's."""
    m = _manifest(folder)
    return bool(owner) and m is not None and all(m.get(k) == _plain(v) for k, v in owner.items())


def marker_text(job: str | None) -> str:
    """The marker of a partial folder; `job` names the run that may resume it (None: none may)."""
    return MARKER_TEXT + (f"{JOB_LINE}{job}\n" if job else "")


def is_resumable(partial: Path, job: str | None) -> bool:
    """Whether `partial` is unsealed work that the run `job` wrote (kept to resume)."""
    try:
        text = (partial / PARTIAL_MARKER).read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(job) and f"{JOB_LINE}{job}\n" in text


def remove_partial(partial: Path) -> None:
    """Remove a partial folder, its marker last: a kill part-way leaves it recognisably ours."""
    if not partial.is_dir():
        return
    for child in partial.iterdir():
        if child.name == PARTIAL_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (partial / PARTIAL_MARKER).unlink(missing_ok=True)
    partial.rmdir()


def clear_partial(partial: Path, out_dir: Path, owner: Mapping[str, Any] | None) -> str | None:
    """Clear what an interrupted run left at `partial`; returns a note saying what it was."""
    if not partial.exists() and not partial.is_symlink():
        return None
    if partial.is_symlink() or not partial.is_dir():
        raise ArtifactError(f"{partial}: exists and is not a folder; remove it or pick another --out")
    if (partial / PARTIAL_MARKER).is_file():
        note = f"{partial}: cleared the unsealed folder of an interrupted run"
    elif not any(partial.iterdir()):
        note = f"{partial}: removed the empty folder of a run killed as it started"
    elif owner and made_by(partial, {k: v for k, v in owner.items() if k != "created"}):
        whose = ("this job's" if made_by(partial, owner) else
                 f"an earlier job's (same source and recipe, created {_manifest(partial).get('created')})")
        note = f"{partial}: {whose} finished artifact, killed before its final rename; rebuilt to the same weights"
        (partial / PARTIAL_MARKER).write_text(MARKER_TEXT)  # ours again should the removal be cut short
    elif (m := _manifest(partial)) is not None:
        recipe = m["recipe"].get("name") if isinstance(m.get("recipe"), dict) else None
        raise ArtifactError(
            f"{partial}: a complete artifact (recipe {recipe!r}, created "
            f"{m.get('created')}) whose final rename never happened, made from another source or recipe than this "
            f"run's; rename it to {out_dir.name} to keep it, or remove it")
    else:
        raise ArtifactError(f"{partial}: exists without the lance-deploy marker or manifest, so it was not made "
                            "by lance-deploy; remove it or pick another --out")
    remove_partial(partial)
    return note


def old_copies(out_dir: Path) -> list[Path]:
    """``OUT.old-<pid>`` folders an ``--overwrite`` leaves while it swaps, newest first."""
    prefix = out_dir.name + OLD_INFIX
    found = [p for p in out_dir.parent.glob(prefix + "*") if p.is_dir() and p.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def old_copy(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}{OLD_INFIX}{os.getpid()}")


def recover_swap(out_dir: Path) -> str | None:
    """Finish what a killed ``--overwrite`` left half-swapped (see the module doc)."""
    olds = old_copies(out_dir)
    if not olds:
        return None
    if not out_dir.exists():
        os.replace(olds[0], out_dir)
        return (f"{out_dir}: put back the previous artifact from {olds[0].name} (an --overwrite was killed "
                "between its two renames)")
    for old in olds:
        shutil.rmtree(old)
    return f"{out_dir}: removed {', '.join(o.name for o in olds)}, left over by an interrupted --overwrite"
