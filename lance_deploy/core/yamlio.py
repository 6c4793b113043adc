"""Bounded YAML reading for small config tables (GPU presets): a size cap before parsing, plain
data only (`yaml.safe_load`), and every failure as one SchemaError line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lance_deploy.core.schema import SchemaError

MAX_BYTES = 1024 * 1024


def load_file(path: str | Path, max_bytes: int = MAX_BYTES) -> Any:
    """The plain data in the YAML file at `path`, or a one-line SchemaError."""
    import yaml

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SchemaError(f"{path}: file not found") from None
    except OSError as e:
        raise SchemaError(f"{path}: cannot read it ({e.strerror})") from None
    if len(raw) > max_bytes:
        raise SchemaError(f"{path}: {len(raw):,} bytes of YAML, more than the {max_bytes:,} allowed")
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SchemaError(f"{path}: not valid YAML{at}: {' '.join(str(e.problem or e).split())}") from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise SchemaError(f"{path}: not valid YAML ({' '.join(str(e).split())[:120]})") from None
