"""Write random checkpoints in the exact release layout (``make-checkpoint``).

``--tiny`` has the golden fixture shapes; ``--full`` has the release shapes
(24.7 GB F32 ``Lance_3B``, 28.4 GB ``Lance_3B_Video``, 1.3 GB BF16 ViT, 2.8 GB VAE)
and is written tensor by tensor, so RAM stays at about one tensor (the 1.2 GB
``embed_tokens``). Values are deterministic per (seed, file, key) and follow the
golden recipe (README §2) so that forward passes produce non-degenerate numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from lance_deploy.checkpoint.layout import MODEL_DIRS, VAE_FILE, VIT_CONFIG, VIT_DIR, VIT_FILE
from lance_deploy.checkpoint.make_tokenizer import TOKEN_IDS, write_tokenizer
from lance_deploy.checkpoint.make_vae import vae_shapes, write_vae_pth
from lance_deploy.checkpoint.names import LATENT_POS_KEY, expected_lance_shapes, expected_vit_shapes
from lance_deploy.checkpoint.outliers import DEFAULT_FACTOR, OutlierPlan, write_record
from lance_deploy.checkpoint.safetensors_write import SafetensorsWriter
from lance_deploy.config import FULL_LLM, TINY_LLM, LLMConfig
from lance_deploy.core.errors import LanceError, LanceUsageError


@dataclass(frozen=True)
class MakeSpec:
    """Shapes of one random release: the LLM config, latent table rows, VAE widths."""

    cfg: LLMConfig
    latent_rows: dict[str, int]
    vae_enc_dim: int
    vae_dec_dim: int
    metadata: dict[str, str] | None
    outlier_channels: int  # per norm with --outliers: ~0.4-6 % of hidden, like real Qwen outlier dims


SPECS = {
    # The tiny Video table is cut to 7 frames like the golden one (the real one has 31).
    # The golden files carry {"format": "pt"}; the release files carry no __metadata__ - with
    # none, our headers reproduce the release byte sizes exactly (24,740,959,248 B etc.).
    "tiny": MakeSpec(TINY_LLM, {"image": 64 * 64, "video": 7 * 64 * 64}, 8, 16, {"format": "pt"}, 4),
    "full": MakeSpec(FULL_LLM, {"image": 64 * 64, "video": 31 * 64 * 64}, 160, 256, None, 8),
}
RELEASE_ENTRIES = frozenset(MODEL_DIRS.values()) | {VIT_DIR, VAE_FILE}
"""Top-level names of a release folder; --force only replaces a folder holding nothing else."""
VAE_GAINS = {"decoder.head.2.weight": 0.6}
"""Extra gains of the golden recipe: decoder head 0.6, second conv of every residual block 0.5."""


def _release_config(cfg: LLMConfig) -> dict:
    """``llm_config.json``: the model shape with the ids of our tokenizer, in the release field set."""
    cfg = dataclasses.replace(
        cfg, bos_token_id=TOKEN_IDS["<|endoftext|>"], eos_token_id=TOKEN_IDS["<|im_end|>"],
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"], vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
        video_token_id=TOKEN_IDS["<|video_pad|>"])
    d = cfg.to_dict()
    # Fields of the real Qwen2.5-VL config that LLMConfig does not model; kept so the file
    # has the release field set (upstream reads it with Qwen2Config.from_json_file).
    for k, v in (("vision_token_id", TOKEN_IDS["<|vision_pad|>"]), ("image_token_id", TOKEN_IDS["<|image_pad|>"]),
                 ("initializer_range", 0.02), ("max_window_layers", 70), ("sliding_window", 32768),
                 ("transformers_version", "4.49.0"), ("use_cache", True)):
        d.setdefault(k, v)
    d["vision_config"].pop("model_type", None)  # only the standalone ViT config.json carries it
    return d


def _generation_config() -> dict:
    pad, eos = TOKEN_IDS["<|endoftext|>"], TOKEN_IDS["<|im_end|>"]
    return {"bos_token_id": pad, "pad_token_id": pad, "do_sample": True, "eos_token_id": [eos, pad],
            "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
            "transformers_version": "4.49.0"}


def init_value(key: str, shape: tuple[int, ...], seed: int, tag: str) -> torch.Tensor:
    """Random F32 value of one tensor, a pure function of (seed, tag, key)."""
    if key == LATENT_POS_KEY:
        return torch.zeros(shape)  # ignored at load (regenerated); zeros are cheap
    digest = hashlib.sha256(f"{seed}/{tag}/{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    t = torch.randn(shape, generator=gen)
    if key.endswith("embed_tokens.weight"):
        return t
    if key.endswith(".gamma") or (key.endswith(".weight") and len(shape) == 1):  # norm scales
        return t.mul_(0.1).add_(1.0)
    if key.endswith(".bias"):
        return t.mul_(0.05)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    gain = VAE_GAINS.get(key, 0.5 if key.endswith("residual.6.weight") else 1.0)
    return t.mul_(gain / math.sqrt(max(fan_in, 1)))


def _nbytes(shapes: dict[str, tuple[int, ...]], itemsize: int) -> int:
    return sum(math.prod(s) for s in shapes.values()) * itemsize


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int, tag: str,
                       bar: tqdm, metadata: dict[str, str] | None, plan: OutlierPlan | None = None) -> None:
    keys = sorted(shapes)  # same order as safetensors' own save_file
    with SafetensorsWriter(path, [(k, dtype, shapes[k]) for k in keys], metadata=metadata) as w:
        for k in keys:
            t = init_value(k, shapes[k], seed, tag)
            if plan is not None:  # in float32, before the storage cast; t is ours, so in place
                t = plan.apply(k, t, inplace=True)
            t = t.to(dtype)
            w.write(k, t)
            bar.update(t.numel() * t.element_size())
            del t


def _prepare_out(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_file() or out.is_symlink():
        raise LanceUsageError(f"{out}: exists and is not a folder; choose another output path")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not force:
        raise LanceUsageError(f"{out}: already exists and is not empty; pass --force to replace it")
    # --force deletes OUT: only ever a previous checkpoint, never e.g. a home folder given by mistake.
    foreign = [e for e in entries if e not in RELEASE_ENTRIES]
    if foreign:
        raise LanceUsageError(f"{out}: holds {foreign[0]!r}, which is not part of a checkpoint; "
                              f"refusing to replace it even with --force")


def _commit(partial: Path, out: Path) -> None:
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(partial, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()


def make_checkpoint(out: str | Path, size: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0,
                    force: bool = False, progress: bool | None = None,
                    log: Callable[[str], None] = lambda s: None, outliers: bool = False,
                    outlier_factor: float = DEFAULT_FACTOR) -> Path:
    """Write a random checkpoint in the release layout at ``out``; returns ``out``.

    ``size`` is 'tiny' or 'full'; ``dtype`` (float32 or bfloat16) applies to both
    ``model.safetensors`` files, the standalone ViT is BF16 and the VAE F32 as
    released. Built in ``OUT.partial-<pid>`` and renamed into place at the end.
    ``outliers`` plants function-preserving activation outliers of ``outlier_factor``
    in both LLM files (``checkpoint.outliers``) and records them in ``outliers.json``
    beside each ``model.safetensors``.
    """
    if size not in SPECS:
        raise LanceUsageError(f"size must be 'tiny' or 'full', not {size!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise LanceUsageError(f"dtype must be float32 or bfloat16, not {dtype}")
    spec, out = SPECS[size], Path(out)
    plans = {v: OutlierPlan.for_config(spec.cfg, spec.outlier_channels, outlier_factor, seed, v)
             for v in MODEL_DIRS} if outliers else {}
    _prepare_out(out, force)
    lance = {v: expected_lance_shapes(spec.cfg, v, spec.latent_rows[v]) for v in MODEL_DIRS}
    vit = expected_vit_shapes(spec.cfg.vision)
    vae = vae_shapes(spec.vae_enc_dim, spec.vae_dec_dim)
    item = torch.empty((), dtype=dtype).element_size()
    total = sum(_nbytes(s, item) for s in lance.values()) + _nbytes(vit, 2) + _nbytes(vae, 4)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total > free:
        raise LanceError(f"{out.parent}: needs {total / 1e9:.1f} GB free for this checkpoint, has {free / 1e9:.1f} GB")
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"make-checkpoint --{size}",
                  disable=None if progress is None else not progress) as bar:

            def note(msg: str) -> None:  # the bar shows the current file; log() gets it too
                bar.set_postfix_str(msg)
                log(msg)

            for variant, folder in MODEL_DIRS.items():
                d = partial / folder
                note(f"{folder}/")
                write_tokenizer(d, with_config=variant == "video")  # the release has none in Lance_3B/
                (d / "llm_config.json").write_text(json.dumps(_release_config(spec.cfg), indent=2) + "\n")
                (d / "generation_config.json").write_text(json.dumps(_generation_config(), indent=2) + "\n")
                _write_safetensors(d / "model.safetensors", lance[variant], dtype, seed, variant, bar,
                                   spec.metadata, plans.get(variant))
                if variant in plans:
                    write_record(d, plans[variant], lance[variant])
            note(f"{VIT_DIR}/")
            (partial / VIT_DIR).mkdir()
            (partial / VIT_DIR / VIT_CONFIG).write_text(json.dumps(spec.cfg.vision.to_dict(), indent=2) + "\n")
            _write_safetensors(partial / VIT_DIR / VIT_FILE, vit, torch.bfloat16, seed, "vit", bar,
                               spec.metadata)
            note(f"{VAE_FILE}")
            write_vae_pth(partial / VAE_FILE, vae, lambda k, s: init_value(k, s, seed, "vae"), bar.update)
        _commit(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
