"""The list of registered commands; each lives in its own module."""

from __future__ import annotations

from lance_deploy.cli.demo_cmd import demo_cmd
from lance_deploy.cli.export_cmd import build_engine_cmd, export_group, verify_cmd
from lance_deploy.cli.inspect_cmd import inspect_cmd
from lance_deploy.cli.make_cmd import make_cmd
from lance_deploy.cli.plan_cmd import plan_cmd
from lance_deploy.cli.plan_memory import memory_plan_cmd
from lance_deploy.cli.quantize_cmd import calibrate_cmd, eval_cmd, quantize_cmd
from lance_deploy.cli.run_cmd import run_command
from lance_deploy.cli.serve_cmd import serve_cmd

ALL: list = [run_command, inspect_cmd, make_cmd, demo_cmd, plan_cmd, memory_plan_cmd, calibrate_cmd, quantize_cmd, eval_cmd, export_group, verify_cmd, build_engine_cmd,
                   serve_cmd]
