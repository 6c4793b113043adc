"""What made an output: the request's options and the loaded model, as one JSON-able dict.

`output_metadata` builds the object every PNG / MP4 / sidecar carries (`media.metadata` writes
and reads it); `request_from_metadata` turns it back into the same `TaskRequest`, so an image can
be re-made from its own file (given the same input media, for the tasks that take one).

The model is named by its folder name and `checkpoint.fingerprint` digest (for a quantized
artifact: the digest of the checkpoint it was made from, plus the artifact's name, recipe and
manifest sha256), never by its full path: a shared image does not reveal the sharer's folders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lance_deploy import __version__
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.media.metadata import FORMAT
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.tasks import TaskRequest

# metadata key -> SamplerConfig field (the metadata uses the `run` option names)
SAMPLER_KEYS = {"steps": "steps", "shift": "shift", "cfg": "cfg_scale", "cfg_interval": "cfg_interval",
                "renorm_min": "renorm_min"}
# the request's own options besides the text, seed and sampler (its height/width/frames may be None:
# the output's size is stored beside them)
OPTION_FIELDS = ("height", "width", "frames", "preset", "vae_area_side", "vit_area_side", "video_fps", "question",
                 "system", "max_new_tokens")


@dataclass
class LoadInfo:
    """Where a pipeline's weights came from; the fingerprint is computed once, on first use."""

    path: Path | None = None  # the model folder or artifact folder (None: components built in memory)
    artifact: bool = False
    layout: object = None  # checkpoint.layout.ReleaseLayout of a release checkpoint
    _model: dict | None = field(default=None, repr=False)

    def model(self) -> dict:
        """{name, fingerprint, variant} (+ artifact {name, manifest_sha256} and recipe for an artifact)."""
        if self._model is None:
            self._model = self._describe()
        return self._model

    def _describe(self) -> dict:
        if self.path is None:
            return {"name": None, "fingerprint": None}
        if self.artifact:
            from lance_deploy.artifact.manifest import MANIFEST_NAME

            raw = (self.path / MANIFEST_NAME).read_bytes()
            manifest = json.loads(raw)  # verified when the artifact loaded
            source = manifest.get("source", {})
            return {"name": self.path.name, "fingerprint": source.get("fingerprint"), "variant": source.get("variant"),
                    "artifact": {"name": self.path.name, "manifest_sha256": hashlib.sha256(raw).hexdigest()},
                    "recipe": manifest.get("recipe", {}).get("name")}
        from lance_deploy.checkpoint.fingerprint import source_fingerprint

        fp = source_fingerprint(self.layout)
        return {"name": self.layout.model_dir.name, "fingerprint": fp.digest, "variant": fp.variant}


def output_metadata(req: TaskRequest, load: LoadInfo, *, backend: str | None, dtype: str | None, device: str | None,
                    frames: int | None, height: int | None, width: int | None) -> dict:
    """The parameters JSON of one output (`media.metadata.FORMAT`): the request, the output's size,
    the model, the backend and the lance-deploy version."""
    s = req.sampler
    model = dict(load.model())
    recipe = model.pop("recipe", None)
    return {
        "format": FORMAT, "task": req.task, "prompt": req.prompt, "negative_prompt": req.negative_prompt or None,
        "seed": req.seed, "steps": s.steps, "shift": s.shift, "cfg": s.cfg_scale,
        "cfg_interval": list(s.cfg_interval), "renorm_min": s.renorm_min,
        "width": width, "height": height, "frames": frames,
        "request": {k: getattr(req, k) for k in OPTION_FIELDS},
        "init_noise": req.init_noise is not None,
        "model": model, "recipe": recipe, "backend": backend, "dtype": dtype, "device": device,
        "version": f"lance-deploy {__version__}",
    }  # no timestamp: the same run gives the same bytes (the file's mtime says when)


def request_from_metadata(meta: dict, *, image=None, video=None) -> TaskRequest:
    """The `TaskRequest` that made an output, from its parameters JSON (and the same input media).
    An output made from `--init-noise` needs that noise again: set `init_noise` on the result."""
    if meta.get("format") != FORMAT:
        raise LanceUsageError(f"not {FORMAT} parameters (format {meta.get('format')!r})")
    try:
        s = {field_: meta[key] for key, field_ in SAMPLER_KEYS.items()}
        s["cfg_interval"] = tuple(s["cfg_interval"])
        opts = dict(meta["request"])
        return TaskRequest(task=meta["task"], prompt=meta["prompt"], negative_prompt=meta.get("negative_prompt"),
                           seed=meta["seed"], sampler=SamplerConfig(**s), image=image, video=video, **opts)
    except (KeyError, TypeError) as e:
        raise LanceUsageError(f"{FORMAT} parameters without a usable {e}") from None
