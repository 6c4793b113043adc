"""`lance-deploy inspect PATH`: what is in a checkpoint, from headers only."""

from __future__ import annotations

import click

from lance_deploy.cli.common import echo_json


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--vit", type=click.Path(path_type=str), default=None,
              help="Qwen2.5-VL-ViT folder or vit.safetensors (default: found beside the model folder).")
@click.option("--vae", type=click.Path(path_type=str), default=None,
              help="Wan2.2_VAE.pth (default: found beside the model folder).")
def inspect_cmd(path: str, as_json: bool, vit: str | None, vae: str | None) -> None:
    """Per-component parameter counts, bytes and stored dtypes of a Lance checkpoint.

    PATH is the download folder (both Lance_3B/ and Lance_3B_Video/ are
    inspected) or one model folder. Only headers are read, so this is instant
    even for the 28 GB F32 release.

    \b
    Examples:
      lance-deploy inspect ~/models/Lance
      lance-deploy inspect ~/models/Lance/Lance_3B_Video --json
    """
    from lance_deploy.checkpoint.inspect import format_report, inspect_path, report_to_dict

    reports = inspect_path(path, vit=vit, vae=vae)
    if as_json:
        echo_json({"path": path, "models": [report_to_dict(r) for r in reports]})
        return
    click.echo("\n\n".join(format_report(r) for r in reports))
