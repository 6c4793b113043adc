"""Shared CLI plumbing: the one error handler and JSON output."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable

import click

from lance_deploy.core.errors import LanceError


def _debug_requested() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    if root is not None and root.obj and root.obj.get("debug"):
        return True
    return "--debug" in sys.argv


def guarded(ctx: click.Context, call: Callable):
    """Run `call()`, turning our exceptions into one line on stderr and their exit code
    (1 runtime, 2 usage, 130 interrupted); `--debug` adds the traceback."""
    try:
        return call()
    except LanceError as e:
        if _debug_requested():
            traceback.print_exc()
        click.echo(f"Error: {e}", err=True)
        ctx.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        ctx.exit(130)
    except MemoryError:
        if _debug_requested():
            traceback.print_exc()
        click.echo("Error: out of host memory; try --dtype bfloat16 or a smaller size.", err=True)
        ctx.exit(1)


class LanceCommand(click.Command):
    """A command that handles its own errors when invoked without the `lance-deploy` group
    (tests, embedding); under the group, the group does it."""

    def invoke(self, ctx: click.Context):
        if ctx.parent is not None:
            return super().invoke(ctx)
        return guarded(ctx, lambda: super(LanceCommand, self).invoke(ctx))


class LanceGroup(click.Group):
    """A Click group whose commands' errors go through `guarded`."""

    command_class = LanceCommand

    def invoke(self, ctx: click.Context):
        if ctx.parent is not None:
            return super().invoke(ctx)
        return guarded(ctx, lambda: super(LanceGroup, self).invoke(ctx))


def echo_json(obj) -> None:
    """Print one JSON object on stdout (for --json)."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
