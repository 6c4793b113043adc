"""Results on disk: one file per job under <out>/results, written atomically, with its parameters.

A PNG carries them in its `lance-deploy` and `parameters` chunks, an MP4 in its comment tag and a
JSON sidecar of the same name (`media.metadata`: the format `lance-deploy run` writes), an x2t
answer is a JSON file. A job whose params ask for it (KEEP_FRAMES: the UI's video edit sessions)
also keeps its video's exact frames as a .npy, since the MP4 is lossy. `encode` makes the bytes (a
Ray replica sends them to the ingress); `write` puts them in place.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from lance_deploy.core.fsutil import atomic_path
from lance_deploy.media.metadata import dumps, png_text
from lance_deploy.media.preprocess import TARGET_FPS  # as `lance-deploy run` writes

NAME = re.compile(r"^job_[0-9a-f]{20}\.(png|mp4|json|npy)$")
MEDIA_TYPES = {"png": "image/png", "mp4": "video/mp4", "json": "application/json", "npy": "application/octet-stream"}
KEEP_FRAMES = "keep_frames"  # a params key: also store a video's frames losslessly (uint8 .npy, no pickle)


def result_meta(job, output, model_id: str) -> dict:
    """The output's parameters (`pipeline.provenance`: task, prompt, seed, model, ...) plus the job's."""
    return {**output.meta, "job_id": job.id, "served_model": model_id, "params": job.params,
            "notes": list(output.notes), "timings": {k: round(float(v), 4) for k, v in output.timings.items()}}


def encode(job, output, model_id: str, eos_id: int | None = None) -> tuple[list[tuple[str, bytes]], dict]:
    """-> ([(file name, bytes)], the result JSON of the job) for a pipeline output."""
    meta = result_meta(job, output, model_id)
    if hasattr(output, "text"):
        ids = output.token_ids
        ended = bool(ids) and ids[-1] == eos_id
        finish = "length" if not ended and len(ids) >= job.request.max_new_tokens else "stop"
        usage = {"prompt_tokens": output.prompt_tokens, "completion_tokens": len(ids),
                 "total_tokens": output.prompt_tokens + len(ids)}
        result = {"text": output.text, "finish_reason": finish, "usage": usage}
        name = f"{job.id}.json"
        return [(name, json.dumps({**meta, **result}, indent=1).encode())], {**result, "files": [name]}
    frames = output.frames
    if frames.shape[0] == 1:
        from lance_deploy.media.io import png_bytes

        name, data = f"{job.id}.png", png_bytes(frames[0], png_text(meta))
        files = [(name, data)]
    else:
        name = f"{job.id}.mp4"
        sidecar = json.dumps({**meta, "fps": TARGET_FPS}, indent=1).encode()
        files = [(name, _mp4_bytes(frames, dumps(meta)))]
        if job.params.get(KEEP_FRAMES):
            files.append((f"{job.id}.npy", _npy_bytes(frames)))
        files.append((f"{job.id}.json", sidecar))
    result = {"files": [n for n, _ in files], "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
              "width": int(frames.shape[2]), "seed": job.request.seed, "notes": meta["notes"]}
    return files, result


def _npy_bytes(frames) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()


def _mp4_bytes(frames, comment: str) -> bytes:
    from lance_deploy.media.io import write_video

    with tempfile.TemporaryDirectory(prefix="lance-serve-") as tmp:
        path = Path(tmp) / "out.mp4"
        write_video(frames, path, fps=TARGET_FPS, comment=comment)
        return path.read_bytes()


class ResultStore:
    def __init__(self, out: Path):
        self.root = Path(out) / "results"
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, files: list[tuple[str, bytes]]) -> None:
        """Each file atomically; a sidecar after its MP4, so a sidecar always names a complete video."""
        for name, data in files:
            with atomic_path(self.root / name) as tmp:
                tmp.write_bytes(data)

    def path(self, name: str) -> Path | None:
        """The stored file `name`, or None (also for any name that is not a result's: no traversal)."""
        if not NAME.match(name):
            return None
        p = self.root / name
        return p if p.is_file() else None
