"""`lance-deploy make-checkpoint`: random weights in the exact release layout."""

from __future__ import annotations

import click


@click.command("make-checkpoint", epilog="""\b
Examples:
  lance-deploy make-checkpoint --tiny exported/tiny
  lance-deploy make-checkpoint --tiny --outliers exported/tiny-outliers
  lance-deploy make-checkpoint --full --dtype bfloat16 /data/lance-random
""")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--tiny", is_flag=True, help="Golden-fixture shapes (hidden 64, 2 layers); ~25 MB.")
@click.option("--full", is_flag=True,
              help="Release shapes: ~57 GB at float32 (24.7 GB Lance_3B, 28.4 GB Video, ViT, VAE).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Storage dtype of the two model.safetensors (the ViT stays BF16, the VAE F32, as released).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--force", is_flag=True, help="Replace OUT if it already holds a checkpoint.")
@click.option("--outliers", is_flag=True,
              help="Plant Qwen-style activation outliers (a few hidden channels per norm, 4 tiny / 8 full) "
                   "without changing what the model computes; recorded in <model>/outliers.json.")
@click.option("--outlier-factor", type=float, default=None,
              help="With --outliers: how much larger the planted channels are (default 30). The same function "
                   "up to float32 rounding; with --dtype bfloat16 the rescaled weights round differently.")
def make_cmd(out: str, tiny: bool, full: bool, dtype: str, seed: int, force: bool, outliers: bool,
             outlier_factor: float) -> None:
    """Write a random Lance checkpoint to OUT in the release folder layout.

    OUT gets Lance_3B/, Lance_3B_Video/ (with the bundled ViT), Qwen2.5-VL-ViT/
    and Wan2.2_VAE.pth, plus a tiny Qwen2-format tokenizer. Tensors are
    generated and written one at a time (RAM ~ one tensor); the folder appears
    only when complete.
    """
    from lance_deploy.core.errors import LanceUsageError

    # Two flags, not one shared destination: with a shared one the last flag silently wins.
    if tiny and full:
        raise LanceUsageError("--tiny and --full contradict each other; choose one")
    if not (tiny or full):
        raise LanceUsageError("choose --tiny or --full")
    size = "tiny" if tiny else "full"
    import math
    import sys

    import torch

    from lance_deploy.checkpoint.make import make_checkpoint

    # On a terminal the progress bar names the file being written; elsewhere (logs, CI) one line per file.
    log = (lambda s: None) if sys.stderr.isatty() else (lambda s: click.echo(f"writing {s}", err=True))
    from lance_deploy.checkpoint.outliers import DEFAULT_FACTOR

    if outlier_factor is not None and not outliers:
        raise LanceUsageError("--outlier-factor needs --outliers")
    if outlier_factor is not None and not (math.isfinite(outlier_factor) and outlier_factor > 1):
        raise LanceUsageError(f"--outlier-factor {outlier_factor}: expected a finite number above 1")
    path = make_checkpoint(out, size=size, dtype=getattr(torch, dtype), seed=seed, force=force, log=log,
                           outliers=outliers, outlier_factor=outlier_factor or DEFAULT_FACTOR)
    click.echo(f"wrote {path}")
