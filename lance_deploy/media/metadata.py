"""The parameters an output carries, and reading them back.

Every generated file says how it was made, in one JSON object (`FORMAT`; built by
`pipeline.provenance.output_metadata`):

* PNG: a tEXt chunk ``lance-deploy`` holding the JSON, and a ``parameters`` chunk in the
  one-line-per-field form A1111-style image tools display::

      a red boat
      Negative prompt: blurry
      Steps: 30, Sampler: Euler (flow), Schedule: shift 3.5, CFG scale: 4, Seed: 42, Size: 768x768, ...

* MP4: the JSON as the container's ``comment`` tag, and the same JSON in a sidecar
  ``<name>.json`` beside the video.

`read_metadata(path)` returns the JSON object of any of the three.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from lance_deploy.core.errors import LanceUsageError

FORMAT = "lance-deploy/1"
PNG_KEY = "lance-deploy"
A1111_KEY = "parameters"


def dumps(meta: dict) -> str:
    """The JSON text stored in a chunk, a comment tag or a sidecar (one line, key order kept)."""
    return json.dumps(meta, ensure_ascii=False, separators=(", ", ": "))


def png_text(meta: dict) -> dict[str, str]:
    """The tEXt chunks of a PNG: the JSON and the A1111 `parameters` text."""
    return {PNG_KEY: dumps(meta), A1111_KEY: a1111_parameters(meta)}


def _a1111_value(v) -> str:
    text = f"{v:g}" if isinstance(v, float) else str(v)
    # A1111 quotes a value that would split the line (commas, colons, newlines)
    return json.dumps(text) if any(c in text for c in ",:\n\"") else text


def a1111_parameters(meta: dict) -> str:
    """`prompt`, `Negative prompt: ...` (only when there is one), then `Key: value, ...`."""
    model = meta.get("model") or {}
    fields = [
        ("Steps", meta.get("steps")), ("Sampler", "Euler (flow)"), ("Schedule", f"shift {meta.get('shift', 0):g}"),
        ("CFG scale", meta.get("cfg")), ("Seed", meta.get("seed")),
        ("Size", f"{meta.get('width')}x{meta.get('height')}"),
        ("Frames", meta.get("frames") if (meta.get("frames") or 1) > 1 else None),
        ("Model hash", (model.get("fingerprint") or "")[:10] or None), ("Model", model.get("name")),
        ("Recipe", meta.get("recipe")), ("Task", meta.get("task")), ("Backend", meta.get("backend")),
        ("Version", meta.get("version")),
    ]
    lines = [meta.get("prompt") or ""]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


def write_output(frames, meta: dict, path: str | Path, *, video: bool | None = None, overwrite: bool = True) -> None:
    """Write uint8 [T, H, W, 3] frames with their parameters: a PNG with `png_text(meta)` for one
    frame (unless `video`), else an MP4 with `meta` as its comment, then its sidecar JSON.
    `overwrite=False`: FileExistsError rather than replace the PNG or MP4."""
    from lance_deploy.media.io import write_image, write_video
    from lance_deploy.media.preprocess import TARGET_FPS

    path = Path(path)
    video = frames.shape[0] != 1 or path.suffix.lower() == ".mp4" if video is None else video
    if not video:
        return write_image(frames[0], path, png_text(meta) if meta else None, overwrite=overwrite)
    write_video(frames, path, fps=TARGET_FPS, comment=dumps(meta) if meta else None, overwrite=overwrite)
    if meta:
        from lance_deploy.core.fsutil import publish_bytes

        try:
            publish_bytes(sidecar_path(path), (dumps(meta) + "\n").encode("utf-8"), what="sidecar",
                          overwrite=overwrite)
        except FileExistsError:
            raise LanceUsageError(f"wrote {path}, but its sidecar {sidecar_path(path)} appeared meanwhile; "
                                  "not replaced") from None


def sidecar_path(video: str | Path) -> Path:
    """`clip.mp4` -> `clip.json`."""
    return Path(video).with_suffix(".json")


def read_png_text(path: str | Path) -> dict[str, str]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return {k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)}
    except OSError as e:
        raise LanceUsageError(f"{path}: not a readable PNG ({e})") from None


def mp4_comment(path: str | Path) -> str | None:
    """The container's `comment` tag (ffmpeg's ffmetadata dump; None when there is none)."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"]
    res = subprocess.run(cmd, check=False, capture_output=True, timeout=60)
    if res.returncode != 0:
        raise LanceUsageError(f"{path}: not a readable video ({res.stderr.decode(errors='replace').strip()[:200]})")
    return _ffmetadata_value(res.stdout.decode("utf-8", errors="replace"), "comment")


def _ffmetadata_value(text: str, key: str) -> str | None:
    """One key of an ffmetadata file (`key=value`, with `\\`-escaped `=;#\\` and newlines)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(key + "="):
            continue
        raw = line[len(key) + 1 :]
        while raw.endswith("\\") and not raw.endswith("\\\\") and i + 1 < len(lines):  # an escaped newline
            i += 1
            raw = raw[:-1] + "\n" + lines[i]
        out, esc = [], False
        for c in raw:
            if esc:
                out.append(c)
                esc = False
            elif c == "\\":
                esc = True
            else:
                out.append(c)
        return "".join(out)
    return None


def read_metadata(path: str | Path) -> dict:
    """The parameters JSON of a PNG, an MP4 or a sidecar; a one-line error when it has none."""
    path = Path(path)
    if not path.is_file():
        raise LanceUsageError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".png":
        text = read_png_text(path).get(PNG_KEY)
    elif suffix == ".mp4":
        text = mp4_comment(path)
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8")
    else:
        raise LanceUsageError(f"{path}: expected a .png, .mp4 or .json written by lance-deploy")
    if not text:
        raise LanceUsageError(f"{path}: carries no lance-deploy parameters")
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise LanceUsageError(f"{path}: its lance-deploy parameters are not JSON ({e})") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise LanceUsageError(f"{path}: not {FORMAT} parameters (format {found!r})")
    return meta
