"""What a request may ask for, checked before anything is loaded (`TaskRequest.validate`).

Caps are about what the model supports and what can finish: beyond them a run is garbage,
an allocation failure deep inside, or a job that would never end.
"""

from __future__ import annotations

import math
import operator

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.model.lance import MAX_LATENT_SIZE

SPATIAL_STRIDE = 16  # VAE 16x spatial compression
# The latent position table covers 64 x 64 cells = 1024 px a side; beyond it upstream's positions wrap
# (the 21:9 bucket of its own 768 preset already does). Twice that side and area is the cap.
TABLE_SIDE = MAX_LATENT_SIZE * SPATIAL_STRIDE
MAX_SIDE = 2 * TABLE_SIDE  # pixels, height or width
MAX_AREA = 2 * TABLE_SIDE * TABLE_SIDE  # pixels per frame
MAX_STEPS = 1000
MAX_NEW_TOKENS = 4096
MAX_TEXT_CHARS = 8192  # prompt, question and system prompt, each
MAX_TEXT_TOKENS = 8192
MAX_CFG = 100.0  # upstream uses 4; far above ~20 the guided velocity is noise
MAX_SHIFT = 100.0
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's signed range, kept non-negative


def _as_int(option: str, value) -> int:
    try:
        return operator.index(value)  # int, numpy int; not float, not bool-as-text
    except TypeError:
        raise LanceUsageError(f"{option} {value!r}: expected a whole number") from None


def integer(option: str, value, lo: int, hi: int, what: str = "") -> int:
    """`value` as an int in [lo, hi], or one line naming `option` and the range."""
    v = _as_int(option, value)
    if not lo <= v <= hi:
        raise LanceUsageError(f"{option} {v}: expected {what or 'a whole number'} from {lo} to {hi}")
    return v


def real(option: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """`value` as a finite float in [lo, hi] ((lo, hi] with `lo_open`), naming `option` otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LanceUsageError(f"{option} {value!r}: expected a number") from None
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        lo_text = f"above {lo:g}" if lo_open else f"from {lo:g}"
        raise LanceUsageError(f"{option} {value}: expected a finite number {lo_text} up to {hi:g}")
    return v


def text(option: str, value: str | None) -> None:
    """A caption / question / system prompt: text, within MAX_TEXT_CHARS."""
    if value is not None and not isinstance(value, str):
        raise LanceUsageError(f"{option}: expected text, got {type(value).__name__}")
    if value is not None and len(value) > MAX_TEXT_CHARS:
        raise LanceUsageError(f"{option} is {len(value):,} characters; the limit is {MAX_TEXT_CHARS:,}")


def tokens(option: str, value: str | None, tokenizer) -> None:
    """The same text within MAX_TEXT_TOKENS once tokenized (needs the checkpoint's tokenizer)."""
    if value:
        n = len(tokenizer.encode(value))
        if n > MAX_TEXT_TOKENS:
            raise LanceUsageError(f"{option} is {n:,} tokens; the limit is {MAX_TEXT_TOKENS:,}")


def size(option: str, value, default: int) -> int:
    """An output side: a multiple of 16 from 16 to MAX_SIDE (None -> `default`; 0 is not None)."""
    if value is None:
        return default
    v = _as_int(option, value)
    if v <= 0 or v % SPATIAL_STRIDE or v > MAX_SIDE:
        raise LanceUsageError(f"{option} {v}: expected a positive multiple of {SPATIAL_STRIDE} "
                              f"up to {MAX_SIDE} (the model's limit)")
    return v


def area(height: int, width: int) -> None:
    if height * width > MAX_AREA:
        raise LanceUsageError(f"--height {height} --width {width}: {height * width:,} pixels a frame, over the "
                              f"{MAX_AREA:,}-pixel limit (e.g. 1024x2048)")


def bucket_side(option: str, value, crop: int, buckets) -> int:
    """A --vae-area-side / --vit-area-side override: every bucket it makes (`buckets(side)` ->
    [(h, w)]) must be at least `crop` pixels a side and within MAX_SIDE / MAX_AREA."""
    v = integer(option, value, 1, MAX_SIDE, "a bucket side in pixels")
    if v < crop:
        raise LanceUsageError(f"{option} {v}: too small, buckets need at least {crop} pixels a side")
    made = buckets(v)
    small = min(made, key=min)
    if min(small) < crop:
        raise LanceUsageError(f"{option} {v}: too small, its {small[0]}x{small[1]} bucket is under {crop} "
                              "pixels a side")
    for h, w in made:
        if max(h, w) > MAX_SIDE or h * w > MAX_AREA:
            raise LanceUsageError(f"{option} {v}: too large, its {h}x{w} bucket is over the {MAX_SIDE}-pixel "
                                  f"side / {MAX_AREA:,}-pixel area limit")
    return v
