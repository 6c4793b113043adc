"""Reads that stay inside an artifact folder.

The writer never makes a symlink, so any symlink in the folder (``manifest.json`` included) is
refused up front; every open then uses ``O_NOFOLLOW`` as well, so a link swapped in afterwards
fails instead of being followed. Paths come from the manifest, already checked by
``manifest.check_relpath`` to be plain relative names.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lance_deploy.artifact.manifest import ArtifactError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_symlinks(root: Path) -> None:
    """ArtifactError naming the first symlink found anywhere under ``root``."""
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise ArtifactError(f"{path}: is a symlink; an artifact holds only its own files, so a link "
                                    "(which could point outside the folder) is refused")


def open_inside(root: Path, rel: str) -> int:
    """A read-only fd of ``root/rel``, refusing a symlink at the last component."""
    path = root / rel
    try:
        return os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing from the artifact (the manifest lists it)") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot open inside the artifact ({e.strerror})") from None


def read_inside(root: Path, rel: str, max_bytes: int) -> bytes:
    """The whole of ``root/rel`` (at most ``max_bytes``; a bigger file is refused, not read)."""
    fd = open_inside(root, rel)
    try:
        size = os.fstat(fd).st_size
        if not stat.S_ISREG(os.fstat(fd).st_mode) or size > max_bytes:
            raise ArtifactError(f"{root / rel}: not a regular file of at most {max_bytes:,} bytes")
        chunks, got = [], 0
        while got < size:
            chunk = os.read(fd, size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
