"""The shipped calibration and held-out prompt sets (``calibration/``, see its README).

One JSON Lines file per task, one object per line with exactly one text field
(``prompt`` / ``instruction`` / ``question``). The loader is strict on purpose: a typo
in a field name or a stray blank line would otherwise silently shrink or skew what a
quantizer is calibrated on, so every problem raises ``LanceUsageError`` with the file
and line number.

Tasks that need media (i2v, the edits, understanding) take it from images / videos the
model generates from the t2i / t2v prompts of the same split (``MEDIA_SOURCE``,
``media_source_index``), so held-out evaluation media never derive from calibration text.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from lance_deploy.core.errors import LanceUsageError

FIELDS = {"t2i": "prompt", "t2v": "prompt", "i2v": "prompt", "image_edit": "instruction",
          "video_edit": "instruction", "x2t_image": "question", "x2t_video": "question"}
"""Task -> the one text field of each line."""

MEDIA_SOURCE = {"i2v": "t2i", "image_edit": "t2i", "x2t_image": "t2i", "video_edit": "t2v", "x2t_video": "t2v"}
"""Task -> the generation set whose outputs serve as its input media."""

SPLITS = ("calib", "heldout")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding calibration/


def set_path(task: str, root: str | Path = "calibration", split: str = "calib") -> Path:
    """Path of one prompt file: ``ROOT/<task>.jsonl`` or ``ROOT/heldout/<task>.jsonl``.

    A relative ``root`` that does not exist in the working directory is looked up in the
    project checkout, so the default works from any directory.
    """
    if task not in FIELDS:
        raise LanceUsageError(f"unknown calibration task {task!r}; expected one of {', '.join(FIELDS)}")
    if split not in SPLITS:
        raise LanceUsageError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    base = Path(root)
    if not base.is_absolute() and not base.exists() and (_PROJECT_ROOT / base).exists():
        base = _PROJECT_ROOT / base
    return (base / "heldout" if split == "heldout" else base) / f"{task}.jsonl"


def normalized(text: str) -> str:
    """Lower-case words only: the identity used for duplicate and overlap checks."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _parse_line(path: Path, n: int, line: str, field: str) -> dict:
    where = f"{path}, line {n}"
    if not line.strip():
        raise LanceUsageError(f"{where}: empty line (one JSON object per line, no blank lines)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LanceUsageError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise LanceUsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if set(obj) != {field}:
        raise LanceUsageError(f"{where}: expected exactly the field {field!r}, got {sorted(obj)}")
    if not isinstance(obj[field], str) or not obj[field].strip():
        raise LanceUsageError(f"{where}: {field!r} must be a non-empty string")
    return obj


def load_prompt_set(task: str, root: str | Path = "calibration", split: str = "calib") -> list[dict]:
    """The entries of one set, in file order, e.g. ``[{"prompt": "..."}, ...]``.

    Raises ``LanceUsageError`` for a missing file, an invalid or empty line, a wrong
    field, or a duplicate (same words, ignoring case and punctuation), naming the line.
    """
    path, field = set_path(task, root, split), FIELDS[task]
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LanceUsageError(f"{path}: no {split} prompt set for {task} (file not found)") from None
    except UnicodeDecodeError as e:
        raise LanceUsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        obj = _parse_line(path, n, line, field)
        key = normalized(obj[field])
        if key in seen:
            raise LanceUsageError(f"{path}, line {n}: duplicate of line {seen[key]}")
        seen[key] = n
        out.append(obj)
    if not out:
        raise LanceUsageError(f"{path}: the {split} prompt set for {task} is empty")
    return out


def select(prompts: list[dict], n: int, seed: int = 0) -> list[dict]:
    """A deterministic subset of ``n`` entries, kept in their original order.

    Entries are ranked by a hash of (seed, entry text), not by position or Python's RNG:
    the same seed gives the same subset on every platform and version, a smaller ``n``
    gives a subset of a larger one, and appending entries to a file does not reshuffle
    which old ones are picked.
    """
    if not 0 <= n <= len(prompts):
        raise LanceUsageError(f"cannot select {n} of {len(prompts)} prompts")

    def rank(i: int) -> bytes:
        ident = json.dumps(prompts[i], sort_keys=True)
        return hashlib.sha256(f"{seed}\0{ident}".encode()).digest()

    chosen = sorted(range(len(prompts)), key=rank)[:n]
    return [prompts[i] for i in sorted(chosen)]


def media_source_index(i: int, n_sources: int) -> int:
    """Index in the ``MEDIA_SOURCE`` set whose generated media entry ``i`` uses (cycled)."""
    if n_sources < 1:
        raise LanceUsageError("no media source prompts to pair with")
    return i % n_sources
