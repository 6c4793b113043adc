"""Shared CLI plumbing: error handling, JSON output, size parsing."""

from __future__ import annotations

import json
import sys
import traceback

import click

from lance_deploy.errors import LanceError


def _debug_requested() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    if root is not None and root.obj and root.obj.get("debug"):
        return True
    return "--debug" in sys.argv


class LanceGroup(click.Group):
    """A Click group that maps our exceptions to one-line errors and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LanceError as e:
            if _debug_requested():
                traceback.print_exc()
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except MemoryError:
            if _debug_requested():
                traceback.print_exc()
            click.echo("Error: out of host memory; try --dtype bfloat16 or a smaller size.", err=True)
            sys.exit(1)


def echo_json(obj) -> None:
    """Print one JSON object on stdout (for --json)."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
