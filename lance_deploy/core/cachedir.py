"""Where lance-deploy keeps what it can rebuild (exported graph caches): a user cache folder,
never a checkpoint or download folder, which may be read-only, shared or checksummed.

``$XDG_CACHE_HOME/lance-deploy`` (default ``~/.cache/lance-deploy``) per the XDG base-directory
spec; a relative ``XDG_CACHE_HOME`` is ignored, as the spec says.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "lance-deploy"


def user_cache_dir(*parts: str) -> Path:
    """`$XDG_CACHE_HOME/lance-deploy/<parts>` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root.joinpath(APP, *parts)
