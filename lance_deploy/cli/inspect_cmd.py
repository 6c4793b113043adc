"""`lance-deploy inspect PATH`: what is in a checkpoint (headers only) or a quantized artifact
(formats, bytes and the sha256 state of every shard). Exit 2 when it finds problems."""

from __future__ import annotations

import click

from lance_deploy.cli.common import echo_json
from lance_deploy.core.errors import LanceUsageError


@click.command("inspect", epilog="""\b
Examples:
  lance-deploy inspect ~/models/Lance
  lance-deploy inspect ~/models/Lance/Lance_3B_Video --json
  lance-deploy inspect exported/lance-fp8
""")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--no-verify", is_flag=True, help="Artifacts: skip the sha256 check of the shards.")
@click.option("--vit", type=click.Path(path_type=str), default=None,
              help="Qwen2.5-VL-ViT folder or vit.safetensors (default: found beside the model folder).")
@click.option("--vae", type=click.Path(path_type=str), default=None,
              help="Wan2.2_VAE.pth (default: found beside the model folder).")
def inspect_cmd(path: str, as_json: bool, no_verify: bool, vit: str | None, vae: str | None) -> None:
    """Per-component parameter counts, bytes and stored dtypes of a Lance checkpoint, or the
    formats, bytes and checksum state of a quantized artifact.

    PATH is the download folder (both Lance_3B/ and Lance_3B_Video/ are
    inspected), one model folder, or an artifact folder (with manifest.json). A
    checkpoint's headers only are read, so this is instant even for the 28 GB
    F32 release; an artifact's shards are read once to check every sha256.
    Problems are listed and the exit code is 2.
    """
    from lance_deploy.artifact.load import is_artifact

    if is_artifact(path) or path.rstrip("/").endswith(".partial"):  # the reader refuses an unsealed one
        from lance_deploy.artifact.inspect import (
            format_report,
            inspect_artifact,
            report_to_dict,
        )

        rep = inspect_artifact(path, verify=not no_verify)
        problems = rep.problems
        if as_json:
            echo_json({"path": path, **report_to_dict(rep)})
        else:
            click.echo(format_report(rep))
    else:
        from lance_deploy.checkpoint.inspect import (
            format_report,
            inspect_path,
            report_to_dict,
        )

        reports = inspect_path(path, vit=vit, vae=vae)
        problems = [p for r in reports for p in r.problems]
        if as_json:
            echo_json({"path": path, "models": [report_to_dict(r) for r in reports]})
        else:
            click.echo("\n\n".join(format_report(r) for r in reports))
    if problems:
        first = " ".join(problems[0].split())
        raise LanceUsageError(f"{path}: {len(problems)} problem(s) found (see the report); first: {first}")
