"""The list of registered commands; each lives in its own module."""

from __future__ import annotations

from lance_deploy.cli.run_cmd import run_command

ALL: list = [run_command]
