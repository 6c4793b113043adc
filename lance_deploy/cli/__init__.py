"""The `lance-deploy` command line: a thin Click layer over the stage functions.

Every command turns `LanceError` into a one-line message on stderr (exit 1 for
runtime errors, 2 for usage errors); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from lance_deploy.core.host_memory import prefer_huge_pages

prefer_huge_pages()  # before torch is imported (click's commands import it): see core/host_memory.py

import click  # noqa: E402

from lance_deploy import __version__  # noqa: E402
from lance_deploy.cli.common import LanceGroup  # noqa: E402


@click.group(cls=LanceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lance-deploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Quantize, export and run ByteDance Lance on consumer GPUs.

    \b
    Examples:
      lance-deploy make-checkpoint --tiny exported/tiny
      lance-deploy inspect exported/tiny
      lance-deploy run t2i --model exported/tiny/Lance_3B --prompt "a red boat" --out boat.png
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from lance_deploy.cli import commands

    for command in commands.ALL:
        cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    # fewer fragmentation OOMs on long videos; only the CLI sets process-wide state
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cli.main(prog_name="lance-deploy", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
