"""Find the files of a Lance release on disk.

Accepts the download folder (``Lance_3B/``, ``Lance_3B_Video/``, ``Qwen2.5-VL-ViT/``,
``Wan2.2_VAE.pth``) or one model folder, with the ViT and VAE found beside it or
given explicitly. The variant and the stored dtype come from the safetensors
header (never from folder names: users rename folders); no tensor data is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lance_deploy.checkpoint.names import (
    LATENT_POS_KEY,
    LATENT_ROWS,
    VIT_PREFIX,
    check_keys,
    expected_lance_shapes,
)
from lance_deploy.checkpoint.safetensors_io import SafetensorsReader
from lance_deploy.config import LLMConfig, VisionConfig
from lance_deploy.core.errors import CheckpointError

MODEL_DIRS = {"image": "Lance_3B", "video": "Lance_3B_Video"}
VIT_DIR, VIT_FILE, VIT_CONFIG = "Qwen2.5-VL-ViT", "vit.safetensors", "config.json"
VAE_FILE = "Wan2.2_VAE.pth"
WEIGHTS_FILES = ("model.safetensors", "ema.safetensors")  # upstream falls back to ema.* as well
CONFIG_FILE = "llm_config.json"


@dataclass(frozen=True)
class VitSource:
    """Where the ViT weights come from: a file and the key prefix inside it."""

    file: Path
    prefix: str
    bundled: bool


@dataclass(frozen=True)
class ReleaseLayout:
    """The files of one Lance model (image or video) and what their headers say."""

    model_dir: Path
    weights_file: Path
    config_file: Path
    tokenizer_dir: Path
    vit_dir: Path | None
    vit_file: Path | None
    vae_file: Path | None
    variant: str  # 'image' | 'video', from the header
    stored_dtype: str  # 'F32' | 'BF16' (or 'BF16+F32' for a mixed file)
    has_bundled_vit: bool
    latent_rows: int | None = None
    num_tensors: int = 0

    def config(self) -> LLMConfig:
        """The parsed ``llm_config.json`` (an ``LLMConfig``)."""
        return LLMConfig.from_file(self.config_file)

    def vision_config(self, cfg: LLMConfig) -> VisionConfig:
        """The config of the ViT this model runs: the bundled one is described by ``cfg.vision``,
        the standalone one by its own ``config.json`` when present. The one reader that run,
        memory-plan and export share, so a broken file fails the same way in each."""
        if self.has_bundled_vit or self.vit_dir is None or not (self.vit_dir / VIT_CONFIG).is_file():
            return cfg.vision
        return VisionConfig.from_file(self.vit_dir / VIT_CONFIG)

    def open_weights(self) -> SafetensorsReader:
        """A header-validated reader of ``weights_file`` (close it, or use ``with``)."""
        return SafetensorsReader(self.weights_file)

    def check_keys(self, cfg: LLMConfig) -> None:
        """Refuse (CheckpointError naming the file and keys) a weights file whose header lacks a release
        key, has a foreign one or a wrong shape; reads the header only."""
        with self.open_weights() as reader:
            expected = expected_lance_shapes(cfg, self.variant, latent_rows=self.latent_rows)
            check_keys(reader, expected, str(self.weights_file))

    def require_vit(self) -> VitSource:
        """The ViT weights the model uses: the bundled ``vit_model.*`` if present (upstream
        loads them last, so they win), else the standalone file; error naming --vit if neither."""
        if self.has_bundled_vit:
            return VitSource(self.weights_file, VIT_PREFIX, True)
        if self.vit_file is None:
            raise CheckpointError(
                f"{self.model_dir}: this task needs the ViT, but {self.weights_file.name} bundles none and no "
                f"{VIT_DIR}/{VIT_FILE} was found beside it; pass --vit PATH")
        return VitSource(self.vit_file, "", False)

    def require_vae(self) -> Path:
        """Path of ``Wan2.2_VAE.pth``; error naming --vae if it was not found."""
        if self.vae_file is None:
            raise CheckpointError(f"{self.model_dir}: this task needs the VAE, but no {VAE_FILE} was found "
                                  f"beside it; pass --vae PATH")
        return self.vae_file


def is_download_folder(path: Path) -> bool:
    """True if ``path`` holds ``Lance_3B/`` and/or ``Lance_3B_Video/``."""
    return any((path / d).is_dir() for d in MODEL_DIRS.values())


def _find_vit(explicit: str | Path | None, search_root: Path) -> tuple[Path | None, Path | None]:
    if explicit is not None:
        p = Path(explicit)
        file = p / VIT_FILE if p.is_dir() else p
        if not file.is_file():
            raise CheckpointError(f"{p}: --vit must be the {VIT_DIR} folder or its {VIT_FILE}; {file} not found")
        return file.parent, file
    file = search_root / VIT_DIR / VIT_FILE
    return (file.parent, file) if file.is_file() else (None, None)


def _find_vae(explicit: str | Path | None, search_root: Path) -> Path | None:
    if explicit is not None:
        p = Path(explicit)
        file = p / VAE_FILE if p.is_dir() else p
        if not file.is_file():
            raise CheckpointError(f"{p}: --vae must be {VAE_FILE} or the folder holding it; {file} not found")
        return file
    file = search_root / VAE_FILE
    return file if file.is_file() else None


def _model_files(model_dir: Path) -> tuple[Path, Path]:
    weights = next((model_dir / f for f in WEIGHTS_FILES if (model_dir / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir}: no {WEIGHTS_FILES[0]} (or {WEIGHTS_FILES[1]}) in this model folder")
    config = model_dir / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{config}: file not found (expected the release {CONFIG_FILE} beside the weights)")
    has_fast = (model_dir / "tokenizer.json").is_file()
    if not has_fast and not ((model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file()):
        raise CheckpointError(f"{model_dir}: no tokenizer (expected tokenizer.json, or vocab.json + merges.txt)")
    return weights, config


def _header_facts(weights: Path) -> tuple[str, str, bool, int | None, int]:
    with SafetensorsReader(weights) as r:
        bundled = any(k.startswith(VIT_PREFIX) for k in r.keys())
        rows = r.info(LATENT_POS_KEY).shape[0] if LATENT_POS_KEY in r else None
        dtypes = r.stored_dtypes()
        n = len(r)
    # Only the Video model bundles a ViT; an image-model table has one frame of 64x64 rows.
    variant = "video" if bundled or (rows is not None and rows > LATENT_ROWS["image"]) else "image"
    return variant, "+".join(sorted(dtypes)) or "none", bundled, rows, n


def _discover_model(model_dir: Path, vit, vae, variant: str | None) -> ReleaseLayout:
    weights, config = _model_files(model_dir)
    detected, dtype, bundled, rows, n = _header_facts(weights)
    if variant is not None and variant != detected:
        why = "it bundles vit_model.* keys" if bundled else f"its latent table has {rows} rows and no vit_model.* keys"
        raise CheckpointError(f"{weights}: asked for the {variant} model, but this is the {detected} model ({why})")
    vit_dir, vit_file = _find_vit(vit, model_dir.parent)
    return ReleaseLayout(
        model_dir=model_dir, weights_file=weights, config_file=config, tokenizer_dir=model_dir,
        vit_dir=vit_dir, vit_file=vit_file, vae_file=_find_vae(vae, model_dir.parent),
        variant=detected, stored_dtype=dtype, has_bundled_vit=bundled, latent_rows=rows, num_tensors=n)


def discover(path: str | Path, vit: str | Path | None = None, vae: str | Path | None = None,
             variant: str | None = None) -> ReleaseLayout:
    """Locate the files of one Lance model.

    ``path`` is the download folder or a model folder. In a download folder
    ``variant`` picks ``Lance_3B`` ('image') or ``Lance_3B_Video`` ('video');
    without it the only model present is taken, or Lance_3B when both are.
    Given a model folder, ``variant`` (if set) must match what its header says.
    ``vit``/``vae`` override the files found beside the model folder.
    """
    if variant not in (None, "image", "video"):
        raise CheckpointError(f"variant must be 'image' or 'video', not {variant!r}")
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or folder (expected a Lance download or model folder)")
    if root.is_file():
        raise CheckpointError(f"{root}: expected a folder (the download folder or e.g. Lance_3B/), got a file")
    if is_download_folder(root):
        present = [v for v, d in MODEL_DIRS.items() if (root / d).is_dir()]
        chosen = variant or present[0]
        if chosen not in present:
            raise CheckpointError(f"{root}: no {MODEL_DIRS[chosen]}/ folder for the {chosen} model "
                                  f"(found {', '.join(MODEL_DIRS[v] + '/' for v in present)})")
        return _discover_model(root / MODEL_DIRS[chosen], vit, vae, chosen)
    if any((root / f).is_file() for f in WEIGHTS_FILES + (CONFIG_FILE,)):
        return _discover_model(root, vit, vae, variant)
    raise CheckpointError(f"{root}: neither a Lance download folder ({MODEL_DIRS['image']}/, {MODEL_DIRS['video']}/) "
                          f"nor a model folder ({WEIGHTS_FILES[0]} + {CONFIG_FILE})")


def discover_all(path: str | Path, vit: str | Path | None = None,
                 vae: str | Path | None = None) -> list[ReleaseLayout]:
    """Every model under ``path``: both variants of a download folder, or the one model folder."""
    root = Path(path)
    if root.is_dir() and is_download_folder(root):
        return [discover(root, vit, vae, v) for v, d in MODEL_DIRS.items() if (root / d).is_dir()]
    return [discover(root, vit, vae)]
